"""Rollout and update throughput on random-weight transformers with the published shapes of
SD3.5-Medium, FLUX.2 [klein] 4B / 9B and Wan 2.1 T2V 1.3B (benchmarks/random_transformers.py:
the configs are written out there, no weights are needed).

For each model, at a stated batch, resolution and frame count, in bf16 on the device:

* ``rollout_samples_per_s``: the trainer's rollout (``sample`` with SDE steps recorded) and
  ``pipeline_samples_per_s``: diffusers' ``pipe(...)`` (``output_type="latent"``, prompt
  embeddings passed in, so neither side runs a text encoder or VAE) on the same transformer,
  steps and guidance; ``rollout_vs_pipeline`` = ours / theirs (>= 1: ours is as fast). The
  FLUX.2 pipeline needs its VAE's batch-norm statistics even for latents, so it is compared
  only where ``Flux2KleinPipeline`` runs without one (it does not in diffusers 0.42).
* ``update_step_s``: one trained step of Flow-DPPO (forward and backward through LoRA
  adapters of rank 32 on the attention projections, the trainer's ``step_loss``) on a
  minibatch; ``update_tflops`` its matmul FLOPs (counted by ``torch.utils.flop_counter``)
  per second, against ``matmul_peak_tflops``, a bf16 square matmul measured on the same
  device; ``update_fraction_of_peak`` their ratio.
* ``dppo_vs_grpo_update``: the median over pairs of the DPPO / GRPO update-step time ratio,
  alternating the order, on the same rollout and weights.
* ``peak_memory_gb``: ``torch.cuda.max_memory_allocated`` (CPU: growth of the maximum
  resident set) over the rollout and update at the stated batch.

    python benchmarks/gpu_throughput.py --tiny                  # toy sizes on a CPU, < 1 min
    python benchmarks/gpu_throughput.py --out docs/results/gpu_throughput.json  # a GPU
    python benchmarks/gpu_throughput.py --models sd35m wan21-1.3b --batch 8 --resolution 512

Goals on a GPU (docs/cost.md): rollout at least as fast as the pipeline, update at 40 % or
more of the measured matmul peak. No timing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from random_transformers import SHAPES, RandomTransformer  # noqa: E402

from flowdppo.models.finetune import apply_finetuning  # noqa: E402
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout  # noqa: E402
from flowdppo.trainer.update import ObjectiveSpec, step_loss  # noqa: E402

#: Real-size settings per model: (resolution, frames, guidance) at the recipes' values.
REAL = {
    "sd35m": (512, 1, 4.5),
    "flux2-klein-4b": (1024, 1, 1.0),
    "flux2-klein-9b": (1024, 1, 1.0),
    "wan21-1.3b": (480, 33, 5.0),
}
TINY = {name: (64, 5 if SHAPES[name].video else 1, g) for name, (_, _, g) in REAL.items()}
PIPELINES = {"sd35m": "StableDiffusion3Pipeline", "wan21-1.3b": "WanPipeline"}
LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, tiny: bool) -> float:
    n = 512 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    reps = 3 if tiny else 20
    seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / seconds / 1e12


def pipeline_for(model: RandomTransformer):
    """diffusers' own pipeline around the same transformer (no text encoder, no VAE)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = getattr(diffusers, PIPELINES[model.name])
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    none = {p: None for p in names if p not in ("transformer", "scheduler")}
    pipe = cls(transformer=model.module, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe, model: RandomTransformer, n: int, steps: int, guidance: float):
    cond = model.encode(["p"] * n)
    kw = dict(
        prompt_embeds=cond["text"],
        negative_prompt_embeds=cond["text"],
        height=model.resolution,
        width=model.resolution,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    if "pooled" in cond:
        kw.update(pooled_prompt_embeds=cond["pooled"], negative_pooled_prompt_embeds=cond["pooled"])
    if model.shape.video:
        kw["num_frames"] = model.frames
    return lambda: pipe(**kw)


def bench(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    resolution, frames, guidance = (TINY if args.tiny else REAL)[name]
    resolution = args.resolution or resolution
    model = RandomTransformer(name, resolution, frames, tiny=args.tiny, device=device, dtype=dtype)
    n, steps = args.batch, args.steps
    spec = SamplerSpec("flow", torch.linspace(1, 0, steps + 1), 0.7, guidance)
    group = torch.zeros(n, dtype=torch.long)
    prompts = ["p"] * n
    sde = list(range(min(args.sde_steps, steps)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def ours():
        gen = torch.Generator().manual_seed(0)
        return rollout(model, prompts, group, spec, sde, gen, ForwardCounter())

    ours()  # warm-up
    t_ours = statistics.median(timed(ours, device) for _ in range(args.repeats))
    out = {
        "model": name,
        "parameters_m": model.parameters_count() / 1e6,
        "batch": n,
        "resolution": resolution,
        "frames": frames,
        "guidance": guidance,
        "steps": steps,
        "tokens_per_sample": model.tokens(),
        "text_tokens": model.text_tokens(),
        "rollout_samples_per_s": n / t_ours,
    }
    if name in PIPELINES:
        call = pipeline_call(pipeline_for(model), model, n, steps, guidance)
        call()
        t_pipe = statistics.median(timed(call, device) for _ in range(args.repeats))
        out["pipeline_samples_per_s"] = n / t_pipe
        out["rollout_vs_pipeline"] = t_pipe / t_ours
    # The update: LoRA on the attention projections, the trainer's own step_loss.
    targets = sorted(
        {
            m
            for m, mod in model.module.named_modules()
            if isinstance(mod, torch.nn.Linear) and m.endswith(LORA_SUFFIXES)
        }
    )
    apply_finetuning(model, "lora", rank=32, alpha=32.0, targets=targets)
    model.module.to(device=device, dtype=dtype)
    ro = ours()
    adv = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(device)
    idx = torch.arange(n)
    objectives = {
        "dppo": ObjectiveSpec("dppo", dppo_threshold=1e-4, clip_range=1e-4),
        "grpo": ObjectiveSpec("clip", dppo_threshold=1e-4, clip_range=1e-4),
    }

    def update(obj):
        def run():
            loss, _ = step_loss(model, ro, idx, 0, adv, spec, obj, ForwardCounter())
            loss.mean().backward()

        return run

    update(objectives["dppo"])()  # warm-up
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops:
        update(objectives["dppo"])()
    ratios, dppo_times = [], []
    for pair in range(args.pairs):
        order = ("dppo", "grpo") if pair % 2 == 0 else ("grpo", "dppo")
        t = {k: timed(update(objectives[k]), device) for k in order}
        ratios.append(t["dppo"] / t["grpo"])
        dppo_times.append(t["dppo"])
    step = statistics.median(dppo_times)
    out["update_step_s"] = step
    out["update_tflops"] = flops.get_total_flops() / step / 1e12
    out["dppo_vs_grpo_update"] = statistics.median(ratios)
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        out["peak_memory_gb"] = grown * 1024 / 1e9
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes, float32, for a CPU")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=None, help="samples (default 8; tiny 2)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: REAL/TINY)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; tiny 2)")
    ap.add_argument("--sde-steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 8)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.pairs = args.pairs or (2 if args.tiny else 10)
    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "tiny": args.tiny,
        "matmul_peak_tflops": matmul_peak_tflops(device, dtype, args.tiny),
        "models": [],
    }
    for name in args.models:
        row = bench(name, args, device, dtype)
        row["update_fraction_of_peak"] = row["update_tflops"] / report["matmul_peak_tflops"]
        report["models"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
