"""FLUX.2, Qwen-Image and Z-Image adapters against their own diffusers pipelines.

Tiny random pipelines (tests/tiny_pipelines_image.py) saved with save_pretrained and loaded
back through ``model.kind=auto``. Parity: from the same generator, our sampler with all-ODE
steps ends on the latents the pipeline's last step produces (captured with its
``callback_on_step_end``; float32, max abs diff <= 1e-5), with guidance off and on, at a
non-square resolution, and with a non-default scheduler shift. Then: SDE replay ratio 1,
``flowdppo train`` with the family's recipe (dppo, grpo, resume after a crash),
``flowdppo export-lora`` into the plain pipeline, and bad inputs refused before any weight
is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from conftest import assert_sde_replay_gives_ratio_one

from flowdppo.cli import main
from flowdppo.config import DIFFUSERS_KINDS, load_config
from flowdppo.models.diffusers_adapters import (
    ADAPTER_MODULES,
    ADAPTERS,
    build_diffusers_model,
)
from flowdppo.runs import load_run
from flowdppo.trainer.loop import Trainer, make_sampler_spec, metrics_of
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, sample

H, W = 32, 48  # non-square everywhere
SEQ = 32  # text tokens
PROMPTS = ["a red cat", "two dogs on grass"]
ROOT = Path(__file__).resolve().parents[1]


def flux2_call(g: float, n: int) -> dict:
    # [klein] base: CFG against the empty prompt; [dev]: the guidance embedding's value.
    return {"guidance_scale": g}


#: Per family: its model.kind, the guidance it is tested with, and the pipeline's keywords
#: for our guidance weight g (docs/real-models.md, "Guidance").
def qwen_image_call(g: float, n: int) -> dict:
    # True CFG needs an explicit negative prompt in the pipeline; ours is model.negative_prompt.
    return {"true_cfg_scale": g, **({"negative_prompt": [""] * n} if g > 1 else {})}


def z_image_call(g: float, n: int) -> dict:
    return {"guidance_scale": g - 1}  # the pipeline's weight is ours minus 1


FAMILIES = {
    "flux2": ("flux2", 4.0, flux2_call),
    "flux2_dev": ("flux2", 4.0, flux2_call),
    "qwen_image": ("qwen_image", 4.0, qwen_image_call),
    "z_image": ("z_image", 4.0, z_image_call),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def load(pipes, family: str, **kw):
    return build_diffusers_model(
        "auto",
        pipes[family],
        resolution=(H, W),
        dtype="float32",
        device="cpu",
        max_sequence_length=SEQ,
        **kw,
    )


def pipeline_final_latents(pipe, family: str, g: float, steps: int, seed: int) -> torch.Tensor:
    """The latents after the pipeline's last denoising step, in its sampling layout."""
    seen = {}

    def keep(pipe, i, t, tensors):
        seen["latents"] = tensors["latents"].clone()
        return {}

    pipe(
        prompt=list(PROMPTS),  # ZImagePipeline rewrites the list it is given
        height=H,
        width=W,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        max_sequence_length=SEQ,
        callback_on_step_end=keep,
        **FAMILIES[family][2](g, len(PROMPTS)),
    )
    return seen["latents"]


def ode_sample(model, g: float, steps: int, seed: int) -> torch.Tensor:
    noise = model.initial_noise(len(PROMPTS), torch.Generator().manual_seed(seed))
    spec = SamplerSpec("flow", model.sigmas(steps), eta=0.0, guidance_scale=g)
    ours, _ = sample(
        model, model.encode(PROMPTS), noise, spec, [], torch.Generator(), ForwardCounter()
    )
    return ours


def test_every_adapter_module_is_a_config_kind():
    assert DIFFUSERS_KINDS == ("auto", *ADAPTER_MODULES)
    assert set(ADAPTERS) == set(ADAPTER_MODULES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ode_sampler_matches_pipeline(tiny_image_pipes, family):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = load(tiny_image_pipes, family)
    assert type(model).__module__.endswith(FAMILIES[family][0])
    cond = model.encode(PROMPTS)
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    g_on = FAMILIES[family][1]
    static = FlowMatchEulerDiscreteScheduler(shift=2.5)
    for g, scheduler in [(1.0, None), (g_on, None), (g_on, static)]:
        if scheduler is not None:  # a non-default (static) shift replaces the pipeline's
            model.pipe.scheduler = scheduler
        ours = ode_sample(model, g, steps=3, seed=7)
        theirs = pipeline_final_latents(model.pipe, family, g, steps=3, seed=7)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-5, (g, scheduler)
        assert torch.equal(model.pipe.scheduler.sigmas.float(), model.sigmas(3))
    assert model.latent_elements() == theirs[0].numel()
    images = model.decode(ours)
    assert images.shape == (2, 3, H, W) and 0 <= images.min() and images.max() <= 1


def test_flux2_decode_equals_the_pipeline_images(tiny_image_pipes):
    model = load(tiny_image_pipes, "flux2")
    ours = model.decode(ode_sample(model, 4.0, steps=2, seed=3))
    theirs = model.pipe(
        prompt=list(PROMPTS),
        height=H,
        width=W,
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        max_sequence_length=SEQ,
    ).images
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_z_image_encoding_leaves_the_callers_prompts_alone(tiny_image_pipes):
    model = load(tiny_image_pipes, "z_image")
    prompts = list(PROMPTS)
    model.encode(prompts)
    model._encode_batch(prompts)  # the pipeline's encode_prompt rewrites a list it is given
    assert prompts == PROMPTS


def test_step_distilled_flux2_klein_ignores_guidance_as_its_pipeline(tmp_path):
    import tiny_pipelines_image

    path = tiny_pipelines_image.build_flux2_klein(tmp_path / "distilled", is_distilled=True)
    model = load({"distilled": path}, "distilled")
    assert not model.batched_cfg
    ours = ode_sample(model, 4.0, steps=2, seed=1)
    assert torch.equal(ours, ode_sample(model, 1.0, steps=2, seed=1))
    theirs = pipeline_final_latents(model.pipe, "flux2", 4.0, steps=2, seed=1)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_flux2_schedule_depends_on_steps_as_the_pipeline(tiny_image_pipes):
    model = load(tiny_image_pipes, "flux2")
    for steps in (2, 10, 28):
        model.pipe.scheduler.set_timesteps(
            sigmas=model._pipeline_base_sigmas(steps), mu=model.schedule_mu(steps)
        )
        assert torch.equal(model.pipe.scheduler.sigmas.float(), model.sigmas(steps))
    assert model.schedule_mu(2) != model.schedule_mu(28)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sde_replay_gives_ratio_one(tiny_image_pipes, family):
    model = load(tiny_image_pipes, family)
    assert_sde_replay_gives_ratio_one(model, FAMILIES[family][1], steps=4)


# ---------------------------------------------------------------- training
@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    train, held = root / "train.txt", root / "heldout.txt"
    train.write_text("a red cat\ntwo dogs on grass\n")
    held.write_text("a blue bird\n")
    return train, held


#: The shrunk recipe: the family's configs/<family>/<algorithm>.yaml at tiny sizes.
SHRINK = {
    "model.resolution": f"[{H},{W}]",
    "model.dtype": "float32",
    "model.device": "cpu",
    "model.max_sequence_length": SEQ,
    "model.lora_rank": 4,
    "model.lora_alpha": 8,
    "model.gradient_checkpointing": "false",
    "reward.names": "[jpeg_compressibility]",
    "train.iterations": 2,
    "train.prompts_per_iteration": 1,
    "train.group_size": 2,
    "train.minibatch_size": 2,
    "train.grad_accum": 1,
    "train.lr": 5e-2,
    "sampler.num_steps": 2,
    "sampler.num_sde_steps": 1,
    "log.eval_samples_per_prompt": 1,
    "log.eval_every": 0,
    "log.checkpoint_every": 1,
    "log.ref_kl": "false",  # the final evaluation measures the KL to the reference
    "log.tensorboard": "false",
    "data.eval_prompts": 1,
}


def recipe_args(recipe: str, path: Path, files, run: Path, **extra) -> list[str]:
    values = {
        **SHRINK,
        "model.path": str(path),
        "data.train_prompts": str(files[0]),
        "data.heldout_prompts": str(files[1]),
        "log.run_dir": str(run),
        **extra,
    }
    return [str(ROOT / "configs" / recipe), *[f"{k}={v}" for k, v in values.items()]]


class Crash(Exception):
    pass


def train_dppo_grpo_and_resume(pipes, family, recipe_dir, files, tmp_path, monkeypatch):
    """Both algorithms train 2 iterations; a run that crashes after iteration 1 and is
    resumed from the command line ends bit-identical to the uninterrupted one."""
    runs = {}
    for algorithm in ("dppo", "grpo"):
        run = tmp_path / algorithm
        recipe, *overrides = recipe_args(
            f"{recipe_dir}/{algorithm}.yaml", pipes[family], files, run
        )
        cfg = load_config(recipe, overrides)
        assert cfg.model.kind == "auto" and cfg.algorithm == algorithm
        Trainer(cfg, run).train()
        rows = metrics_of(run)
        assert [r["iteration"] for r in rows] == [1, 2]
        # The first replay reproduces the rollout; an iteration whose group rewards tie
        # (a tiny model's JPEG sizes can) has no gradient, but training moved the model.
        assert all(r["first_update_ratio_dev"] < 1e-5 for r in rows)
        assert any(r["grad_norm"] > 0 for r in rows) and rows[1]["eval/train/kl_ref/mean"] > 0
        runs[algorithm] = run

    original = Trainer._checkpoint

    def crash_after_one(self):
        original(self)
        if self.iteration == 1:
            raise Crash

    crashed = tmp_path / "crashed"
    recipe, *overrides = recipe_args(f"{recipe_dir}/dppo.yaml", pipes[family], files, crashed)
    cfg = load_config(recipe, overrides)
    monkeypatch.setattr(Trainer, "_checkpoint", crash_after_one)
    with pytest.raises(Crash):
        Trainer(cfg, crashed).train()
    monkeypatch.setattr(Trainer, "_checkpoint", original)
    assert main(["train", "--resume", str(crashed)]) == 0
    digest = [
        json.loads((r / "ckpt-000002" / "state.json").read_text())["sha256"]
        for r in (runs["dppo"], crashed)
    ]
    assert digest[0] == digest[1]
    return runs["dppo"]


def export_reproduces_training(pipes, family, run: Path, out: Path, capsys) -> None:
    """export-lora's file, loaded by the plain pipeline's load_lora_weights, samples the
    trained policy (eta 0) and not the base model."""
    from diffusers import DiffusionPipeline

    assert main(["export-lora", str(run), str(out)]) == 0
    assert "load_lora_weights" in capsys.readouterr().out
    _, _, model, _ = load_run(run)
    cfg = load_config(run / "config.yaml", ["sampler.num_steps=3"])
    spec = make_sampler_spec(cfg, model.shift, model.num_train_timesteps, model)
    spec = SamplerSpec("flow", spec.sigmas, 0.0, spec.guidance_scale)
    noise = model.initial_noise(2, torch.Generator().manual_seed(5))
    ours, _ = sample(
        model, model.encode(PROMPTS), noise, spec, [], torch.Generator(), ForwardCounter()
    )

    pipe = DiffusionPipeline.from_pretrained(pipes[family])
    pipe.set_progress_bar_config(disable=True)
    base = pipeline_final_latents(pipe, family, spec.guidance_scale, steps=3, seed=5)
    pipe.load_lora_weights(out)
    adapted = pipeline_final_latents(pipe, family, spec.guidance_scale, steps=3, seed=5)
    assert (adapted - ours).abs().max().item() <= 1e-5  # the pipeline samples our policy
    assert (adapted - base).abs().max().item() > 1e-4  # and training changed it


@pytest.mark.parametrize("family", ["flux2", "qwen_image", "z_image"])
def test_recipes_train_resume_and_export(
    tiny_image_pipes, prompt_files, tmp_path, monkeypatch, capsys, family
):
    recipes = FAMILIES[family][0]
    run = train_dppo_grpo_and_resume(
        tiny_image_pipes, family, recipes, prompt_files, tmp_path, monkeypatch
    )
    export_reproduces_training(tiny_image_pipes, family, run, tmp_path / "lora", capsys)


# ---------------------------------------------------------------- bad inputs
def configs_only(src: Path, dst: Path) -> Path:
    """A copy of a pipeline directory with its JSON configs and none of its weights."""
    for f in src.rglob("*.json"):
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.relative_to(src))
    assert not list(dst.rglob("*.safetensors"))
    return dst


@pytest.mark.parametrize(
    "change,key,hint",
    [
        ({"model.resolution": "[30,48]"}, "model.resolution", "use e.g. 32"),
        ({"model.resolution": "[32,50]"}, "model.resolution", "use e.g. 48"),
        ({"model.kind": "sd3"}, "model.kind", "use model kind 'flux2' or auto"),
        ({"model.frames": 5}, "model.frames", "drop model.frames"),
        ({"model.path": "models/not-here"}, "model.path", "does not exist"),
        ({"class": "StableDiffusionXLPipeline"}, "model.path", "Flux2KleinPipeline (flux2)"),
    ],
    ids=["height", "width", "kind", "frames", "relative-path", "unsupported-class"],
)
def test_bad_inputs_end_before_any_weight_is_read(
    tiny_image_pipes, prompt_files, tmp_path, monkeypatch, capsys, change, key, hint
):
    model_dir = configs_only(tiny_image_pipes["flux2"], tmp_path / "weightless")
    change = dict(change)
    if "class" in change:
        index = json.loads((model_dir / "model_index.json").read_text())
        index["_class_name"] = change.pop("class")
        (model_dir / "model_index.json").write_text(json.dumps(index))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = recipe_args("flux2/dppo.yaml", model_dir, prompt_files, run, **change)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}") and hint in err[0], err
    assert not run.exists()


def test_a_users_adapter_is_named_by_import_path(
    tiny_image_pipes, prompt_files, tmp_path, monkeypatch, capsys
):
    # A user's module, not part of flowdppo: an adapter for the Z-Image pipeline class.
    (tmp_path / "my_adapters.py").write_text(
        "from flowdppo.models.diffusers_adapters.z_image import ZImageModel\n\n"
        "class MyZImage(ZImageModel):\n"
        "    pipeline_classes = ('ZImagePipeline',)\n\n"
        "class NotAnAdapter:\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load(tiny_image_pipes, "z_image", adapter="my_adapters:MyZImage")
    assert type(model).__name__ == "MyZImage"
    run = tmp_path / "run"
    for adapter, message in [
        ("my_adapters:NotAnAdapter", "is not a subclass of"),
        ("my_adapters:MyZImage", "model.adapter MyZImage takes ZImagePipeline"),
    ]:
        args = recipe_args(
            "flux2/dppo.yaml",
            tiny_image_pipes["flux2"],
            prompt_files,
            run,
            **{"model.adapter": adapter},
        )
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: model.adapter") and message in err[0]
    assert not run.exists()
