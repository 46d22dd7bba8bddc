"""Real diffusers models through the command line: ``flowdppo train`` with ``task=prompts``.

Tiny random SD3, FLUX and Wan pipelines are saved to disk and named by ``model.path``, so
every run goes through the config validator, the prompts task, the reward registry and
the one Trainer loop, exactly as a user's run on real weights would. ``export-lora`` output
is loaded into a plain diffusers pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_pipelines
from conftest import checkpoint_digests, crash_after_checkpoint

from flowdppo.cli import main
from flowdppo.config import ConfigError, load_config
from flowdppo.runs import load_run
from flowdppo.trainer import media
from flowdppo.trainer.loop import Trainer, metrics_of
from flowdppo.trainer.rollout import ForwardCounter, sample

RES = 32
SEQ = 16
FRAMES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tiny_pipes) -> dict[str, Path]:
    return tiny_pipes


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    train, held = root / "train.txt", root / "heldout.txt"
    # Blank lines and surrounding spaces are ignored.
    train.write_text("a red cat\n\n  two dogs on grass  \n")
    held.write_text("a blue bird\n")
    return train, held


def overrides(kind: str, path: Path, files: tuple[Path, Path], run_dir: Path, **extra) -> list:
    args = {
        "task": "prompts",
        "model.kind": kind,
        "model.path": str(path),
        "model.resolution": RES,
        "model.dtype": "float32",
        "model.device": "cpu",
        "model.max_sequence_length": SEQ,
        "model.lora_rank": 4,
        "model.lora_alpha": 8,
        "data.train_prompts": str(files[0]),
        "data.heldout_prompts": str(files[1]),
        "data.eval_prompts": 1,
        "reward.names": "[jpeg_compressibility]",
        "train.iterations": 2,
        "train.prompts_per_iteration": 1,
        "train.group_size": 2,
        "train.minibatch_size": 2,
        "train.lr": 1e-2,
        "sampler.num_steps": 2,
        "sampler.num_sde_steps": 1,
        "log.eval_samples_per_prompt": 2,
        "log.tensorboard": "false",
        # Every iteration (a diffusers model's default is every 10) on the whole batch
        # (its default is one sample per group): the first KL is then exactly 0, the
        # reference forward seeing the rollout's rows (a 1-row forward rounds differently).
        "log.ref_kl_every": 1,
        "log.ref_kl_samples": 2,
        "log.run_dir": str(run_dir),
    }
    if kind == "wan":
        args["model.frames"] = FRAMES
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def gif_ms(path: Path) -> int:
    """A GIF's playing time (Pillow merges equal neighbouring frames into a longer one)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        return sum(frame.info["duration"] for frame in ImageSequence.Iterator(gif))


def check_run(run_dir: Path) -> list[dict]:
    rows = metrics_of(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2]
    # The first replay of every iteration reproduces the rollout: ratio 1.
    assert all(r["first_update_ratio_dev"] < 1e-5 for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    # The LoRA starts as the identity, so the KL to the reference is 0 before the first
    # update and positive after it.
    assert rows[0]["kl_ref/mean"] == 0 and rows[1]["kl_ref/mean"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["eval/heldout/kl_ref/mean"] > 0
    assert (run_dir / "grids" / "iter-000002.png").is_file()
    return rows


@pytest.mark.parametrize("algorithm", ["dppo", "grpo", "cps", "dppo+cps"])
def test_every_algorithm_trains_sd3_from_the_command_line(
    pipes, prompt_files, tmp_path, algorithm, capsys
):
    run = tmp_path / "run"
    rc = main(
        ["train", *overrides("sd3", pipes["sd3"], prompt_files, run), f"algorithm={algorithm}"]
    )
    assert rc == 0, capsys.readouterr().err
    rows = check_run(run)
    key = "masked_fraction" if algorithm.startswith("dppo") else "clip_fraction"
    assert all(key in r for r in rows)
    cfg = load_config(run / "config.yaml")
    assert cfg.model.kind == "sd3" and cfg.kernel == ("cps" if "cps" in algorithm else "flow")


def test_flux_trains_with_its_guidance_embedding_and_own_schedule(pipes, prompt_files, tmp_path):
    cfg = load_config(
        None,
        overrides(
            "flux",
            pipes["flux"],
            prompt_files,
            tmp_path / "run",
            **{
                "sampler.guidance_scale": 3.5,
                "sampler.num_steps": 3,
            },
        ),
    )
    trainer = Trainer(cfg, tmp_path / "run")
    # The trainer samples on the pipeline's own schedule (FLUX: dynamic shift from the
    # image token count), not on a static-shift approximation.
    assert torch.equal(trainer.spec.sigmas, trainer.model.sigmas(3))
    trainer.train()
    check_run(tmp_path / "run")


def test_wan_trains_on_video_latents(pipes, prompt_files, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    assert main(["train", *overrides("wan", pipes["wan"], prompt_files, run)]) == 0
    check_run(run)
    _, _, model, _ = load_run(run)
    assert model.latent_shape(1) == (1, 16, 2, RES // 8, RES // 8)  # 5-D: frames 5 -> 2
    grid = Image.open(run / "grids" / "iter-000002.png")  # videos show their middle frame
    # 2 samples x (train, held-out) prompts, a caption over each row, rewards under cells.
    assert grid.size == (2 * 66 + 2, 2 * (11 + 64 + 11 + 2) + 2)
    # The videos themselves play as GIF and MP4 (the video extra).
    assert gif_ms(run / "grids" / "iter-000002.gif") == 5 * 1000 // media.FPS
    assert (run / "grids" / "iter-000002.mp4").stat().st_size > 0


def test_reward_options_reach_the_reward(pipes, prompt_files, tmp_path, monkeypatch):
    from flowdppo.rewards import vision

    seen = []
    real = vision.jpeg_size_kb

    def spy(images, quality=95):
        seen.append(quality)
        return real(images, quality)

    monkeypatch.setattr(vision, "jpeg_size_kb", spy)
    args = overrides("sd3", pipes["sd3"], prompt_files, tmp_path / "run")
    args += ["reward.options.jpeg_compressibility.quality=40", "train.iterations=1"]
    assert main(["train", *args]) == 0
    assert seen and set(seen) == {40}


def test_export_lora_loads_into_a_plain_pipeline(pipes, prompt_files, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    run, out = tmp_path / "run", tmp_path / "lora"
    args = overrides("sd3", pipes["sd3"], prompt_files, run, **{"train.lr": 5e-2})
    assert main(["train", *args]) == 0
    assert main(["export-lora", str(run), str(out)]) == 0
    assert "load_lora_weights" in capsys.readouterr().out
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    # Our trained model's ODE sample and the plain pipeline's, from the same noise.
    _, _, model, _ = load_run(run)
    prompts, steps = ["a red cat", "a blue bird"], 4
    spec = load_run_spec(run, model, steps)
    noise = model.initial_noise(2, torch.Generator().manual_seed(5))
    ours, _ = sample(
        model, model.encode(prompts), noise, spec, [], torch.Generator(), ForwardCounter()
    )

    pipe = StableDiffusion3Pipeline.from_pretrained(pipes["sd3"])
    pipe.set_progress_bar_config(disable=True)

    def pipeline_latents():
        return pipe(
            prompts,
            height=RES,
            width=RES,
            num_inference_steps=steps,
            guidance_scale=1.0,
            latents=noise.clone(),
            output_type="latent",
            max_sequence_length=SEQ,
        ).images

    base = pipeline_latents()
    pipe.load_lora_weights(out)
    adapted = pipeline_latents()
    assert (adapted - ours).abs().max().item() <= 1e-5  # the pipeline now samples our policy
    assert (adapted - base).abs().max().item() > 1e-4  # and training changed it


def load_run_spec(run: Path, model, steps: int):
    from flowdppo.trainer.loop import make_sampler_spec

    cfg = load_config(run / "config.yaml", [f"sampler.num_steps={steps}"])
    return make_sampler_spec(cfg, model.shift, model.num_train_timesteps, model)


# ---------------------------------------------------------------- errors before any work
def test_missing_inputs_name_the_key(pipes, prompt_files, tmp_path, capsys):
    base = overrides("sd3", pipes["sd3"], prompt_files, tmp_path / "run")

    def error(*changes: str) -> str:
        keys = {c.split("=", 1)[0] for c in changes}
        args = [a for a in base if a.split("=", 1)[0] not in keys]
        args += [c for c in changes if not c.endswith("=")]
        assert main(["train", *args]) == 2
        return capsys.readouterr().err

    assert "model.path is not set" in error("model.path=")
    assert "data.train_prompts is not set" in error("data.train_prompts=")
    assert "reward.names is empty" in error("reward.names=")
    missing = str(tmp_path / "nope.txt")
    assert "data.train_prompts: prompt file" in error(f"data.train_prompts={missing}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "holds no prompts" in error(f"data.heldout_prompts={empty}")
    assert "model.path: model path" in error(f"model.path={tmp_path / 'nowhere'}")
    assert "use model kind 'flux'" in error(f"model.path={pipes['flux']}")
    assert "does not take the options" in error("reward.options.jpeg_compressibility.q=1")
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize(
    "changes,match",
    [
        (["model.kind=sd3"], "set task=prompts"),
        (["task=prompts"], "task 'prompts' needs a diffusers model"),
        (["model.path=/x"], r"model.path '/x' \(a diffusers model, model.kind 'auto'\) trains"),
        (["model.adapter=m:A"], r"model.adapter 'm:A' \(a diffusers model, model.kind 'auto'\)"),
        (["model.kind=task", "model.path=/x"], "model.path is for diffusers models"),
        (["task=prompts", "model.kind=sd3", "model.adapter=m:A"], "model.adapter chooses"),
        (["task=prompts", "model.kind=sd3", "model.weights=w.safetensors"], "model.weights"),
        (["data.eval_prompts=3"], "read by task 'prompts' only"),
        (["model.device=gpu"], "model.device"),
        (["model.dtype=fp8"], "model.dtype"),
        (["task=prompts", "model.kind=sd3", "model.resolution=4"], "model.resolution"),
        (["reward.names=[a]", "reward.options={b: {x: 1}}"], "not in reward.names"),
    ],
)
def test_config_refuses_inconsistent_model_keys(changes, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, changes)


# ---------------------------------------------------------------- trainer pieces
# Cells plus a 2 px gap around each; each row has its caption line (11 px) over it.
@pytest.mark.parametrize(
    "shape,size",
    [
        ((3, 1, 8, 8), (2 * 66 + 2, 2 * (11 + 64 + 2) + 2)),  # digits-sized: 64 px cells
        ((2, 3, 96, 160), (2 * 162 + 2, 11 + 96 + 2 + 2)),  # wide, kept at its own size
        ((2, 3, 640, 320), (2 * 130 + 2, 11 + 256 + 2 + 2)),  # tall, shrunk to 256 px
        ((2, 3, 9, 32, 48), (2 * 66 + 2, 11 + 43 + 2 + 2)),  # a video: its middle frame
    ],
)
def test_sample_grid_takes_any_size_and_videos(tmp_path, shape, size):
    from PIL import Image

    images = torch.zeros(shape)
    if len(shape) == 5:
        images[:, :, shape[2] // 2] = 1.0  # only the middle frame is white
    (page,) = media.write_grid(images, ["a"] * shape[0], tmp_path / "g.png", columns=2)
    grid = Image.open(page.png).convert("RGB")
    assert grid.size == size
    if len(shape) == 5:
        assert grid.getpixel((5, 20)) == (255, 255, 255)
        assert gif_ms(page.gif) == shape[2] * 1000 // media.FPS  # every frame


def test_lora_targets_follow_peft_suffix_rule():
    from torch import nn

    from flowdppo.models.finetune import apply_finetuning

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({"to_q": nn.Linear(4, 4), "to_out": nn.ModuleList()})
            self.attn["to_out"].append(nn.Linear(4, 4))

    class Stub:
        def __init__(self):
            self.module = Net()

    model = Stub()
    apply_finetuning(model, "lora", rank=2, alpha=2, targets=["to_q", "to_out.0"])
    names = {n for n, _ in model.module.named_modules()}
    assert any(n.endswith("attn.to_out.0.lora_A") for n in names)
    with pytest.raises(ValueError, match=r"\['out.0'\] match no module"):
        apply_finetuning(Stub(), "lora", rank=2, alpha=2, targets=["to_q", "out.0"])


# ---------------------------------------------------------------- the recipes
ROOT = Path(__file__).resolve().parents[1]


# The baselines' recipes hold their released trainers' settings instead
# (tests/test_recipes.py checks them against docs/method.md, "Recipes").
@pytest.mark.parametrize("name", ["dppo", "dppo_cps"])
def test_sd3_recipes_hold_the_papers_setting(name):
    cfg = load_config(ROOT / "configs" / "sd3" / f"{name}.yaml")
    m, s, t = cfg.model, cfg.sampler, cfg.train
    assert (cfg.task, m.kind, m.finetune, m.lora_rank, m.lora_alpha) == (
        "prompts",
        "sd3",
        "lora",
        32,
        64.0,
    )
    assert (t.lr, m.resolution, t.group_size) == (3e-4, 512, 16)
    assert (s.num_steps, s.num_sde_steps, s.sde_window, s.eta) == (10, 3, (0.0, 0.5), 0.7)
    assert s.guidance_scale == 1.0 and s.shift is None  # the model's own schedule
    assert cfg.algorithm == {"dppo_cps": "dppo+cps"}.get(name, name)


def test_the_documented_sd3_command_runs_with_a_pickscore_model(
    pipes, prompt_files, tmp_path, capsys
):
    # `flowdppo train configs/sd3/dppo.yaml model.path=... data.train_prompts=...
    # reward.options.pickscore.path=...`, shrunk to the tiny pipeline and a tiny CLIP.
    clip = tiny_pipelines.build_clip_model(tmp_path / "clip")
    run = tmp_path / "run"
    shrink = {
        "model.resolution": RES,
        "model.dtype": "float32",
        "model.device": "cpu",
        "model.max_sequence_length": SEQ,
        "model.lora_rank": 4,
        "train.iterations": 1,
        "train.prompts_per_iteration": 1,
        "train.group_size": 2,
        "train.minibatch_size": 1,
        "train.grad_accum": 2,
        "sampler.num_steps": 2,
        "sampler.num_sde_steps": 1,
        "log.eval_samples_per_prompt": 2,
        "data.eval_prompts": 1,
        "log.tensorboard": "false",
        "log.run_dir": str(run),
    }
    args = [
        "train",
        str(ROOT / "configs" / "sd3" / "dppo.yaml"),
        f"model.path={pipes['sd3']}",
        f"data.train_prompts={prompt_files[0]}",
        f"reward.options.pickscore.path={clip}",
        "reward.options.pickscore.device=cpu",
        *[f"{k}={v}" for k, v in shrink.items()],
    ]
    assert main(args) == 0, capsys.readouterr().err
    (row,) = metrics_of(run)
    assert row["first_update_ratio_dev"] < 1e-5 and row["grad_norm"] > 0
    assert "reward/pickscore/mean" in row and "eval/train/reward/pickscore" in row


class Crash(Exception):
    pass


def test_resume_of_a_real_model_run_equals_an_uninterrupted_one(
    pipes, prompt_files, tmp_path, monkeypatch
):
    def run(name):
        args = overrides("sd3", pipes["sd3"], prompt_files, tmp_path / name)
        return load_config(None, [*args, "train.iterations=3", "log.checkpoint_every=1"])

    Trainer(run("full"), tmp_path / "full").train()
    original = Trainer._checkpoint

    def crash_after_one(self):
        original(self)
        if self.iteration == 1:
            raise Crash

    monkeypatch.setattr(Trainer, "_checkpoint", crash_after_one)
    with pytest.raises(Crash):
        Trainer(run("crashed"), tmp_path / "crashed").train()
    monkeypatch.setattr(Trainer, "_checkpoint", original)
    # As `flowdppo train --resume RUN_DIR`: the run's own config.yaml rebuilds the task.
    assert main(["train", "--resume", str(tmp_path / "crashed")]) == 0
    digest = [
        json.loads((tmp_path / r / "ckpt-000003" / "state.json").read_text())["sha256"]
        for r in ("full", "crashed")
    ]
    assert digest[0] == digest[1]  # bit-identical LoRA and optimizer state


@pytest.mark.parametrize("algorithm", ["guard", "nft"])
def test_guard_and_nft_train_sd3_and_resume_bit_exact(
    pipes, prompt_files, tmp_path, monkeypatch, algorithm
):
    def run(name):
        args = overrides("sd3", pipes["sd3"], prompt_files, tmp_path / name)
        return load_config(None, [*args, f"algorithm={algorithm}", "log.checkpoint_every=1"])

    Trainer(run("full"), tmp_path / "full").train()
    rows = metrics_of(tmp_path / "full")
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    if algorithm == "nft":
        # One noise level per sample (int(0.99 x 2) of the 2 steps), at one forward of the
        # old model and one of the policy: the old model's are counted apart.
        assert rows[-1]["forward_samples/update_old"] == rows[-1]["forward_samples/update"]
    crash_after_checkpoint(monkeypatch, lambda: Trainer(run("crashed"), tmp_path / "crashed"), 1)
    assert main(["train", "--resume", str(tmp_path / "crashed")]) == 0
    digest = checkpoint_digests(tmp_path, ("full", "crashed"), 2)
    assert digest[0] == digest[1]  # the policy, the optimizer and (nft) the old model
