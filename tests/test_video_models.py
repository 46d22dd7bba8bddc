"""Wan 2.2 (A14B two experts, TI2V-5B) and HunyuanVideo 1.5 against their own pipelines.

Tiny random pipelines (``tiny_pipelines_video``) saved and loaded back. Parity: from the
same seed, our all-ODE sampler ends on the latents the pipeline returns (float32, max abs
diff <= 1e-5) with guidance off and on, at a non-square size, with the builders'
non-default scheduler shifts; A14B's schedule crosses the expert boundary, so both
experts and ``guidance_scale_2`` are on the path. With SDE steps the replay gives ratio
1. Training runs through ``flowdppo train`` (dppo and grpo) and resumes bit for bit; its
export loads into a plain pipeline with diffusers' own loader (HunyuanVideo 1.5: the
transformer's ``load_lora_adapter``). Bad sizes end before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from conftest import assert_sde_replay_gives_ratio_one
from test_real_training import overrides as real_training_overrides
from test_trainer import crash_after_checkpoint

from flowdppo.cli import main
from flowdppo.models.diffusers_adapters import build_diffusers_model
from flowdppo.models.diffusers_adapters.wan import LOW_NOISE_LORA_FILE, WanExperts
from flowdppo.runs import load_run
from flowdppo.trainer.loop import Trainer, metrics_of
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, sample

SEQ = 16
FRAMES = 5
PROMPTS = ["a red cat", 'a sign that says "hi"']  # quoted text: HunyuanVideo's glyph encoder
# Non-square sizes, multiples of each layout's VAE x patch (16, 32 and 4 pixels).
SIZE = {"wan22_a14b": (32, 48), "wan22_ti2v": (32, 64), "hunyuan_video15": (16, 24)}
LAYOUTS = list(SIZE)
KIND = {"wan22_a14b": "wan", "wan22_ti2v": "wan", "hunyuan_video15": "hunyuan_video15"}

pytestmark = pytest.mark.usefixtures("one_thread")


def load(layout: str, path: Path, **kw):
    return build_diffusers_model(
        KIND[layout],
        path,
        resolution=SIZE[layout],
        frames=FRAMES,
        dtype="float32",
        device="cpu",
        max_sequence_length=SEQ,
        **kw,
    )


def plain_pipeline(layout, path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if layout == "hunyuan_video15":
        pipe.tokenizer_max_length = SEQ  # what model.max_sequence_length sets
    return pipe


def pipeline_latents(pipe, layout, steps, g, g2=None, **kw):
    h, w = SIZE[layout]
    if layout == "hunyuan_video15":
        from diffusers import ClassifierFreeGuidance

        # The pipeline guides through its guider; our g is its guidance_scale.
        pipe.guider = ClassifierFreeGuidance(guidance_scale=g)
    else:
        kw.update(guidance_scale=g, guidance_scale_2=g2, max_sequence_length=SEQ)
    return pipe(
        PROMPTS,
        height=h,
        width=w,
        num_frames=FRAMES,
        num_inference_steps=steps,
        output_type="latent",
        **kw,
    ).frames


def ode(model, steps, g, noise):
    spec = SamplerSpec("flow", model.sigmas(steps), eta=0.0, guidance_scale=g)
    prompts = list(PROMPTS)
    out, _ = sample(
        model, model.encode(prompts), noise, spec, [], torch.Generator(), ForwardCounter()
    )
    assert prompts == PROMPTS  # encoding left the caller's list alone
    return out


@pytest.mark.parametrize("guided", [False, True], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ode_sampler_matches_the_pipeline(tiny_video_pipes, layout, guided):
    g2 = 2.5 if guided and layout == "wan22_a14b" else None
    model = load(layout, tiny_video_pipes[layout], **({"guidance_scale_2": g2} if g2 else {}))
    g, steps = (4.0 if guided else 1.0), 3
    noise = model.initial_noise(2, torch.Generator().manual_seed(7))
    ours = ode(model, steps, g, noise)
    generator = torch.Generator().manual_seed(7)
    theirs = pipeline_latents(model.pipe, layout, steps, g, g2, generator=generator)
    assert ours.shape == theirs.shape == model.latent_shape(2)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert model.latent_elements() == theirs[0].numel()
    # The pipeline's scheduler walked exactly the schedule we sampled on (shift included).
    assert torch.equal(model.pipe.scheduler.sigmas.float(), model.sigmas(steps))
    assert model.pipe.scheduler.config.shift != 1.0
    high = model.high_noise(model.sigmas(steps)[:-1]) if KIND[layout] == "wan" else None
    if layout == "wan22_a14b":
        assert high.any() and not high.all()  # the schedule crosses the boundary
        assert isinstance(model.module, WanExperts)
    elif layout == "wan22_ti2v":
        assert high.all() and model.expand_timesteps and model.latent_shape(1)[1] == 48


def test_mixed_batch_rows_go_to_their_own_expert(tiny_video_pipes):
    model = load("wan22_a14b", tiny_video_pipes["wan22_a14b"], guidance_scale_2=2.0)
    x = model.initial_noise(2, torch.Generator().manual_seed(1))
    cond = model.encode(PROMPTS)
    first, second = ({k: v[i : i + 1] for k, v in cond.items()} for i in (0, 1))
    both = model.velocity(x, torch.tensor([0.95, 0.3]), cond, 3.0)
    high = model.velocity(x[:1], torch.tensor([0.95]), first, 3.0)
    low = model.velocity(x[1:], torch.tensor([0.3]), second, 3.0)
    assert torch.allclose(both, torch.cat([high, low]), atol=1e-6)
    # The low-noise row really ran the other expert (and its own guidance).
    other = model.velocity(x[1:], torch.tensor([0.95]), second, 3.0)
    assert (other - low).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sde_replay_gives_ratio_one_and_trains_every_expert(tiny_video_pipes, layout):
    model = load(layout, tiny_video_pipes[layout])
    assert_sde_replay_gives_ratio_one(model, 4.0)  # SDE steps 0 and 2 of 6
    if layout == "wan22_a14b":
        assert model.high_noise(model.sigmas(6)[[0, 2]]).tolist() == [True, False]
    grads = {n: p.grad for n, p in model.module.named_parameters() if p.requires_grad}
    experts = ["transformer.", "transformer_2."] if layout == "wan22_a14b" else [""]
    for e in experts:
        mine = [g for n, g in grads.items() if f"model.{e}" in n and "blocks" in n]
        assert mine and all(g is not None and torch.isfinite(g).all() for g in mine)
        assert any(g.abs().sum() > 0 for g in mine)


# ---------------------------------------------------------------- through the command line
@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("prompts") / "train.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def overrides(layout, path, prompts, run_dir, **extra) -> list[str]:
    h, w = SIZE[layout]
    shrink = {
        "model.kind": KIND[layout],
        "model.frames": FRAMES,
        "model.resolution": f"[{h},{w}]",
        "data.heldout_prompts": "null",
        "train.lr": 5e-2,
        "sampler.num_steps": 2,
        "sampler.num_sde_steps": 2,  # every step, so on both of A14B's experts
        "sampler.sde_window": "[0.0,1.0]",
        "log.eval_samples_per_prompt": 1,
        "log.checkpoint_every": 1,
        "log.eval_every": 0,
        "train.grad_accum": 1,
        "model.gradient_checkpointing": "false",
        **extra,
    }
    if layout == "hunyuan_video15":
        # Its forward costs ~10x Wan's here (a 2048-wide projection of 256 ByT5 tokens);
        # the per-iteration reference KL is checked on the Wan layouts.
        shrink["log.ref_kl"] = "false"
    return real_training_overrides("wan", path, (prompts, prompts), run_dir, **shrink)


ROOT = Path(__file__).resolve().parents[1]


def recipe(layout: str, algorithm: str) -> str:
    """The family's shipped recipe; the overrides above shrink it to the tiny pipeline."""
    return str(ROOT / "configs" / layout / f"{algorithm}.yaml")


def digest(run: Path, it: int) -> str:
    return json.loads((run / f"ckpt-{it:06d}" / "state.json").read_text())["sha256"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dppo_trains_and_resumes_bit_for_bit(
    tiny_video_pipes, prompt_file, tmp_path, layout, monkeypatch
):
    from flowdppo.config import load_config

    path = tiny_video_pipes[layout]
    full = tmp_path / "full"
    args = overrides(layout, path, prompt_file, full)
    assert main(["train", recipe(layout, "dppo"), *args]) == 0
    rows = metrics_of(full)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["first_update_ratio_dev"] < 1e-5 and r["grad_norm"] > 0 for r in rows)
    if layout != "hunyuan_video15":
        assert rows[0]["kl_ref/mean"] == 0 and rows[1]["kl_ref/mean"] > 0

    crashed = tmp_path / "crashed"
    cfg = load_config(recipe(layout, "dppo"), overrides(layout, path, prompt_file, crashed))
    with crash_after_checkpoint(monkeypatch, 1):
        Trainer(cfg, crashed).train()
    assert main(["train", "--resume", str(crashed)]) == 0
    assert digest(full, 2) == digest(crashed, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grpo_trains_and_its_export_loads_into_a_plain_pipeline(
    tiny_video_pipes, prompt_file, tmp_path, layout, capsys
):
    path = tiny_video_pipes[layout]
    run, out = tmp_path / "run", tmp_path / "lora"
    args = overrides(layout, path, prompt_file, run)
    assert main(["train", recipe(layout, "grpo"), *args]) == 0
    rows = metrics_of(run)
    assert [r["iteration"] for r in rows] == [1, 2] and all("clip_fraction" in r for r in rows)
    assert main(["export-lora", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    _, _, model, _ = load_run(run)
    steps, g = 3, 3.0
    noise = model.initial_noise(2, torch.Generator().manual_seed(5))
    ours = ode(model, steps, g, noise)

    pipe = plain_pipeline(layout, path)
    base = pipeline_latents(pipe, layout, steps, g, latents=noise.clone())
    if layout == "hunyuan_video15":
        # No load_lora_weights on this pipeline class: its transformer loads the file.
        assert not hasattr(pipe, "load_lora_weights")
        assert "pipe.transformer.load_lora_adapter(" in printed
        pipe.transformer.load_lora_adapter(out, weight_name="pytorch_lora_weights.safetensors")
    else:
        pipe.load_lora_weights(out)
    if layout == "wan22_a14b":
        assert (out / LOW_NOISE_LORA_FILE).is_file() and "load_into_transformer_2=True" in printed
        pipe.load_lora_weights(out, weight_name=LOW_NOISE_LORA_FILE, load_into_transformer_2=True)
    adapted = pipeline_latents(pipe, layout, steps, g, latents=noise.clone())
    assert (adapted - ours).abs().max().item() <= 1e-5  # the pipeline samples our policy
    assert (adapted - base).abs().max().item() > 1e-4  # and training changed it


# ---------------------------------------------------------------- errors before any weight
@pytest.mark.parametrize(
    "layout,change,key,fix",
    [
        ("wan22_a14b", "model.frames=6", "model.frames", "use e.g. 5"),
        ("wan22_ti2v", "model.resolution=[32,48]", "model.resolution", "use e.g. 64"),
        ("wan22_a14b", "model.resolution=[44,48]", "model.resolution", "use e.g. 48"),
        ("wan22_ti2v", "sampler.guidance_scale_2=2", "sampler.guidance_scale_2", "drop it"),
        ("hunyuan_video15", "model.frames=8", "model.frames", "use e.g. 9"),
        ("hunyuan_video15", "model.resolution=[18,24]", "model.resolution", "use e.g. 16"),
        ("wan22_a14b", "model.kind=hunyuan_video15", "model.kind", "use model kind 'wan'"),
    ],
)
def test_bad_sizes_end_before_any_weight_is_read(
    tiny_video_pipes, prompt_file, tmp_path, monkeypatch, capsys, layout, change, key, fix
):
    import diffusers

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_loading)
    run = tmp_path / "run"
    path = tiny_video_pipes[layout]
    args = overrides(layout, path, prompt_file, run, **{"sampler.guidance_scale": 3})
    assert main(["train", *args, change]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}") and fix in err[0]
    assert not run.exists()


# ---------------------------------------------------------------- the recipes
# The released checkpoints' JSON configs, as far as the size checks read them.
RELEASED = {
    "wan22_a14b": (
        {
            "transformer": ["diffusers", "x"],
            "transformer_2": ["diffusers", "x"],
            "boundary_ratio": 0.875,
        },
        {"patch_size": [1, 2, 2]},
        {"scale_factor_spatial": 8, "scale_factor_temporal": 4},
    ),
    "wan22_ti2v": (
        {"transformer": ["diffusers", "x"], "expand_timesteps": True},
        {"patch_size": [1, 2, 2]},
        {"scale_factor_spatial": 16, "scale_factor_temporal": 4},
    ),
    "hunyuan_video15": (
        {"transformer": ["diffusers", "x"]},
        {"patch_size": 1, "patch_size_t": 1},
        {"spatial_compression_ratio": 16, "temporal_compression_ratio": 4},
    ),
}


@pytest.mark.parametrize("algorithm", ["dppo", "grpo"])
@pytest.mark.parametrize("family", list(RELEASED))
def test_recipes_fit_the_released_checkpoints(family, algorithm):
    from flowdppo.config import load_config
    from flowdppo.models.diffusers_adapters import ADAPTERS

    path = ROOT / "configs" / family / f"{algorithm}.yaml"
    assert "NOT a published setting" in path.read_text()
    cfg = load_config(path)
    assert (cfg.task, cfg.model.kind, cfg.algorithm) == ("prompts", "auto", algorithm)
    index, transformer, vae = RELEASED[family]
    configs = {"pipeline": index, "transformer": transformer, "vae": vae}.__getitem__
    # Raises PipelineInputError naming the key if the checkpoint cannot take the sizes.
    ADAPTERS[KIND[family]].check_inputs(configs, *cfg.model.resolution, cfg.model.frames)
    # The per-step trust region is resolved against this model's own latent size.
    assert cfg.objective.dppo_threshold_per_step or cfg.objective.clip_range_per_step


def test_auto_kind_picks_the_video_adapters(tiny_video_pipes):
    from flowdppo.models.diffusers_adapters import ADAPTERS, check_pipeline

    for layout, path in tiny_video_pipes.items():
        cls, size = check_pipeline("auto", path, resolution=SIZE[layout], frames=FRAMES)
        assert cls is ADAPTERS[KIND[layout]] and size == SIZE[layout]
