"""SD3, FLUX and Wan adapters against their own diffusers pipelines (tiny random weights).

Parity: from the same seed, our sampler with all-ODE steps ends on the latents the pipeline
returns with ``output_type="latent"`` (float32, max abs diff <= 1e-5), with guidance off and
on. With SDE steps, replaying the rollout gives ratio 1. The exported adapters load into a
plain pipeline with identical outputs. Training through the command line:
``test_real_training.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_pipelines
from conftest import assert_sde_replay_gives_ratio_one

from flowdppo import schedule
from flowdppo.models.diffusers_adapters import (
    DEFAULT_LORA_TARGETS,
    PipelineInputError,
    build_diffusers_model,
    save_lora_for_diffusers,
)
from flowdppo.models.finetune import apply_finetuning
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout, sample

RES = 32
SEQ = 16  # max_sequence_length: short text sequences keep the tiny models fast
FRAMES = 5
PROMPTS = ["a red cat", "two dogs on grass"]
BUILDERS = {
    "sd3": tiny_pipelines.build_sd3,
    "flux": tiny_pipelines.build_flux,
    "wan": tiny_pipelines.build_wan,
}
# The guidance each family's pipeline applies with a scale > 1: SD3 and Wan classifier-free
# guidance, FLUX (dev-style) the distilled guidance embedding.
GUIDANCE = {"sd3": 4.5, "flux": 3.5, "wan": 5.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paths(tiny_pipes) -> dict[str, Path]:
    return tiny_pipes


def load(kind: str, path: Path, **kw):
    frames = FRAMES if kind == "wan" else None
    return build_diffusers_model(
        kind,
        path,
        resolution=kw.pop("resolution", RES),
        frames=frames,
        dtype=kw.pop("dtype", "float32"),
        gradient_checkpointing=kw.pop("gradient_checkpointing", False),
        device="cpu",
        max_sequence_length=SEQ,
        **kw,
    )


def pipeline_latents(model, kind: str, prompts, steps: int, guidance: float, seed: int):
    extra = {"num_frames": FRAMES} if kind == "wan" else {}
    out = model.pipe(
        prompts,
        height=RES,
        width=RES,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        max_sequence_length=SEQ,
        **extra,
    )
    return out.frames if kind == "wan" else out.images


@pytest.mark.parametrize("guided", [False, True], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_ode_sampler_matches_pipeline(paths, kind, guided):
    model = load(kind, paths[kind])
    g = GUIDANCE[kind] if guided else 1.0
    steps = 4
    sigmas = model.sigmas(steps)
    cond = model.encode(PROMPTS)
    noise = model.initial_noise(len(PROMPTS), torch.Generator().manual_seed(7))
    spec = SamplerSpec("flow", sigmas, eta=0.0, guidance_scale=g)
    ours, record = sample(model, cond, noise, spec, [], torch.Generator(), ForwardCounter())
    theirs = pipeline_latents(model, kind, PROMPTS, steps, g, seed=7)
    assert record == {}
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5
    # The latent size that converts per-element trust regions to nats per step is the
    # pipeline's own latent per sample (FLUX's packed latent holds the same elements).
    assert model.latent_elements() == theirs[0].numel()
    # The pipeline's scheduler walked exactly the schedule we sampled on.
    assert torch.equal(model.pipe.scheduler.sigmas.float(), sigmas)


def test_flux_without_guidance_embedding_runs_true_cfg(tmp_path):
    # FLUX.1-schnell-style: no guidance embedding, so guidance is true CFG against the
    # negative prompt; the pipeline's equivalent is negative_prompt + true_cfg_scale.
    path = tiny_pipelines.build_flux(tmp_path / "schnell", guidance_embeds=False)
    model = load("flux", path)
    assert model.batched_cfg
    cond = model.encode(PROMPTS)
    noise = model.initial_noise(2, torch.Generator().manual_seed(3))
    spec = SamplerSpec("flow", model.sigmas(3), eta=0.0, guidance_scale=3.0)
    ours, _ = sample(model, cond, noise, spec, [], torch.Generator(), ForwardCounter())
    theirs = model.pipe(
        PROMPTS,
        negative_prompt=[""] * 2,
        true_cfg_scale=3.0,
        height=RES,
        width=RES,
        num_inference_steps=3,
        latents=noise.clone(),
        output_type="latent",
        max_sequence_length=SEQ,
    ).images
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_wan_unipc_checkpoint_is_sampled_on_the_euler_schedule(paths):
    from diffusers import DiffusionPipeline, UniPCMultistepScheduler

    from flowdppo.models.diffusers_adapters.wan import WanModel

    pipe = DiffusionPipeline.from_pretrained(paths["wan"])
    # What Wan 2.1 checkpoints ship.
    pipe.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    model = WanModel(pipe, resolution=RES, frames=FRAMES, device="cpu", max_sequence_length=SEQ)
    assert model.shift == 3.0 and model.num_train_timesteps == 1000
    assert torch.equal(model.sigmas(10), schedule.sigma_schedule(10, 3.0, num_train_timesteps=1000))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_trainer_schedule_equals_pipeline_schedule(paths, kind):
    model = load(kind, paths[kind])
    for n in (1, 4, 10, 28):
        ours = schedule.sigma_schedule(
            n, model.shift, num_train_timesteps=model.num_train_timesteps
        )
        assert (ours - model.sigmas(n)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_sde_replay_gives_ratio_one(paths, kind):
    assert_sde_replay_gives_ratio_one(load(kind, paths[kind]), GUIDANCE[kind])


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_decode_gives_images_in_unit_range(paths, kind):
    model = load(kind, paths[kind], decode_batch_size=1)
    x = model.initial_noise(2, torch.Generator().manual_seed(0))
    images = model.decode(x)
    shape = (2, 3, FRAMES, RES, RES) if kind == "wan" else (2, 3, RES, RES)
    assert images.shape == shape and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.module.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_lora_export_loads_into_a_plain_pipeline(paths, kind, tmp_path):
    from diffusers import DiffusionPipeline

    model = load(kind, paths[kind])
    apply_finetuning(model, "lora", rank=4, alpha=8, targets=model.default_lora_targets())
    _randomize_lora(model)
    out = save_lora_for_diffusers(model, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    x = model.initial_noise(2, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    cond = model.encode(PROMPTS)
    adapted = model.velocity(x, sigma, cond)
    with model.reference():
        base = model.velocity(x, sigma, cond)

    pipe = DiffusionPipeline.from_pretrained(paths[kind])
    plain = type(model)(
        pipe,
        resolution=RES,
        device="cpu",
        max_sequence_length=SEQ,
        **({"frames": FRAMES} if kind == "wan" else {}),
    )
    assert (plain.velocity(x, sigma, cond) - base).abs().max() <= 1e-6
    pipe.load_lora_weights(out)
    loaded = plain.velocity(x, sigma, cond)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    assert (loaded - adapted).abs().max() <= 1e-5  # alpha / rank scaling included


def test_default_lora_targets_cover_joint_attention(paths):
    model = load("sd3", paths["sd3"])
    targets = model.default_lora_targets()
    suffixes = {t.split("attn.", 1)[1] for t in targets}
    assert suffixes == set(DEFAULT_LORA_TARGETS["sd3"]) - {"to_add_out"}  # 1 block: no text out
    wan = load("wan", paths["wan"]).default_lora_targets()
    assert any(".attn1." in t for t in wan) and any(".attn2." in t for t in wan)


def test_full_finetune_export_is_refused(paths, tmp_path):
    model = load("sd3", paths["sd3"])
    apply_finetuning(model, "full")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora_for_diffusers(model, tmp_path / "x")


def test_prompt_cache_encodes_each_prompt_once(paths):
    model = load("sd3", paths["sd3"], cache_size=2)
    calls = []
    model.pipe.text_encoder_3.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    first = model.encode(["a", "b", "a"])
    again = model.encode(["b", "a"])
    assert calls == [2]  # one batched call for the two distinct prompts
    assert torch.equal(again["prompt_embeds"][1], first["prompt_embeds"][0])
    model.encode(["c"])  # evicts the least recently used ("b")
    assert list(model._cache) == ["a", "c"]
    model.encode(["b"])
    assert calls == [2, 1, 1]


def test_gradient_checkpointing_gives_the_same_gradients(paths):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = load("sd3", paths["sd3"], gradient_checkpointing=ckpt)
        apply_finetuning(model, "lora", rank=4, alpha=8, targets=model.default_lora_targets())
        _randomize_lora(model)
        x = model.initial_noise(2, torch.Generator().manual_seed(1))
        v = model.velocity(x, torch.tensor([0.7, 0.3]), model.encode(PROMPTS))
        v.square().mean().backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.module.parameters() if p.grad is not None])
        )
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_model_keeps_float32_latents(paths):
    model = load("flux", paths["flux"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    spec = SamplerSpec("flow", model.sigmas(3), eta=0.7, guidance_scale=3.5)
    ro = rollout(
        model, PROMPTS, torch.tensor([0, 1]), spec, [1], torch.Generator(), ForwardCounter()
    )
    assert ro.final.dtype == torch.float32 and ro.states.dtype == torch.float32
    assert torch.isfinite(ro.final).all()


# ---------------------------------------------------------------- errors
def test_errors_name_the_path_and_the_fix(paths, tmp_path):
    with pytest.raises(PipelineInputError, match="does not exist"):
        build_diffusers_model("sd3", str(tmp_path / "nope"), resolution=RES)
    with pytest.raises(ValueError, match="no model_index.json"):
        build_diffusers_model("sd3", str(tmp_path), resolution=RES)
    with pytest.raises(ValueError, match=r"holds a StableDiffusion3Pipeline.*use model kind 'sd3'"):
        build_diffusers_model("flux", str(paths["sd3"]), resolution=RES)
    with pytest.raises(ValueError, match="unknown model kind"):
        build_diffusers_model("sdxl", str(paths["sd3"]), resolution=RES)
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_diffusers_model("sd3", str(paths["sd3"]), resolution=RES, dtype="fp8")
    with pytest.raises(ValueError, match="frames is for video models"):
        build_diffusers_model("sd3", str(paths["sd3"]), resolution=RES, frames=5)
    with pytest.raises(PipelineInputError, match="height 30 is not a multiple of 4.*use e.g. 32"):
        load("sd3", paths["sd3"], resolution=30)
    with pytest.raises(PipelineInputError, match="6 frames is not 1 \\+ a multiple of 4.*e.g. 5"):
        build_diffusers_model("wan", str(paths["wan"]), resolution=RES, frames=6, device="cpu")


def test_broken_model_index_is_reported(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_diffusers_model("sd3", str(tmp_path), resolution=RES)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="use model kind 'wan'"):
        build_diffusers_model("sd3", str(tmp_path), resolution=RES)
