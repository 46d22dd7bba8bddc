"""Our rollout sampler against the diffusers pipeline's own ``__call__``, per family.

Same random model (built offline: ``tests/tiny_pipelines.py`` for SD3,
``tests/tiny_pipelines_image.py`` for FLUX.2 [klein] / [dev], Qwen-Image and Z-Image),
resolution, steps, batch, noise and guidance for both; the pipeline returns latents
(``output_type="latent"``, no VAE decode). Timings are paired and interleaved: each of
``--repeats`` rounds (after one warm-up) times every run once, in an order that alternates
between rounds, and a run's ratio is the median over rounds of (pipeline time / its time)
in the same round, so machine load that drifts between rounds cancels. The runs:

* ``pipeline``: ``pipe(prompts, ..., output_type="latent")`` (encodes its prompts each call)
* ``ours_cold``: prompt cache cleared, then ``encode`` + ``sample`` (all ODE)
* ``ours_warm``: ``sample`` with cached prompt encodings (the trainer's steady state)
* ``ours_sde``: ``rollout`` with 3 recorded SDE steps (what one training rollout costs)

and ``throughput_ratio`` = the median paired ratio (> 1: ours is faster). It also checks
that the all-ODE latents equal the pipeline's (the last denoising step's latents, through
the pipeline's step callback, in the sampling layout).

    python benchmarks/sampler_vs_pipeline.py                 # SD3, about a minute
    python benchmarks/sampler_vs_pipeline.py --family images --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tiny_pipelines_image  # noqa: E402
from tiny_pipelines import build_sd3  # noqa: E402

from flowdppo.models.diffusers_adapters import build_diffusers_model  # noqa: E402
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout, sample  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


#: The guidance weight each family is timed with (besides 1.0), and the pipeline keywords
#: for our weight g (docs/real-models.md, "Guidance").
GUIDANCE = {"sd3": 4.5, "flux2": 4.0, "flux2_dev": 4.0, "qwen_image": 4.0, "z_image": 4.0}


def pipeline_guidance(family: str, g: float, n: int) -> dict:
    if family == "qwen_image":
        return {"true_cfg_scale": g, **({"negative_prompt": [""] * n} if g > 1 else {})}
    if family == "z_image":
        return {"guidance_scale": g - 1}
    return {"guidance_scale": g}


def bench(
    model, family: str, prompts: list[str], steps: int, guidance: float, repeats: int, seq: int
) -> dict:
    spec = SamplerSpec("flow", model.sigmas(steps), eta=0.0, guidance_scale=guidance)
    sde_spec = SamplerSpec("flow", model.sigmas(steps), eta=0.7, guidance_scale=guidance)
    group = torch.arange(len(prompts))
    n = len(prompts)

    def noise():
        return model.initial_noise(n, torch.Generator().manual_seed(0))

    def pipeline():
        last = {}

        def keep(pipe, i, t, tensors):
            last["latents"] = tensors["latents"]
            return {}

        model.pipe(
            prompt=list(prompts),
            height=model.height,
            width=model.width,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),  # the same noise as noise()
            output_type="latent",
            max_sequence_length=seq,
            callback_on_step_end=keep,
            **pipeline_guidance(family, guidance, n),
        )
        return last["latents"]

    def ours_cold():
        model._cache.clear()
        model._negative = None
        cond = model.encode(prompts)
        return sample(model, cond, noise(), spec, [], torch.Generator(), ForwardCounter())[0]

    cond = model.encode(prompts)

    def ours_warm():
        return sample(model, cond, noise(), spec, [], torch.Generator(), ForwardCounter())[0]

    def ours_sde():
        gen = torch.Generator().manual_seed(1)
        return rollout(model, prompts, group, sde_spec, [0, 1, 2], gen, ForwardCounter(), cond)

    with torch.no_grad():
        diff = (ours_warm() - pipeline()).abs().max().item()
    runs = {
        "pipeline": pipeline,
        "ours_cold": ours_cold,
        "ours_warm": ours_warm,
        "ours_sde": ours_sde,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        timed(fn)
    for rep in range(repeats):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            times[name].append(timed(runs[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {
        k: [p / t for p, t in zip(times["pipeline"], v)]
        for k, v in times.items()
        if k != "pipeline"
    }
    return {
        "guidance_scale": guidance,
        "max_abs_latent_diff_vs_pipeline": diff,
        "median_s": med,
        "images_per_s": {k: n / v for k, v in med.items()},
        "throughput_ratio": {k: statistics.median(v) for k, v in paired.items()},
        "ratio_range": {k: [min(v), max(v)] for k, v in paired.items()},
    }


def build(family: str, root: Path, ns) -> Path:
    if family == "sd3":
        return build_sd3(root / "sd3", layers=ns.layers, heads=ns.heads, head_dim=ns.head_dim)
    return tiny_pipelines_image.BUILDERS[family](root / family)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--family",
        default="sd3",
        choices=["sd3", *tiny_pipelines_image.BUILDERS, "images"],
        help="images: FLUX.2 [klein], [dev], Qwen-Image and Z-Image at one shared size",
    )
    ap.add_argument("--resolution", type=int, nargs="+", default=None, help="H [W] pixels")
    ap.add_argument("--layers", type=int, default=4, help="SD3 only")
    ap.add_argument("--heads", type=int, default=4, help="SD3 only")
    ap.add_argument("--head-dim", type=int, default=16, help="SD3 only")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32, help="text max_sequence_length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="default docs/results/sampler_vs_pipeline*.json")
    ns = ap.parse_args()
    families = list(tiny_pipelines_image.BUILDERS) if ns.family == "images" else [ns.family]
    if ns.resolution is None:
        ns.resolution = [64] if ns.family == "sd3" else [64, 96]
    size = tuple(ns.resolution * 2 if len(ns.resolution) == 1 else ns.resolution[:2])
    suffix = "" if ns.family == "sd3" else f"_{ns.family}"
    out = Path(ns.out or f"docs/results/sampler_vs_pipeline{suffix}.json")
    torch.set_num_threads(ns.threads)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    prompts = [f"prompt number {i}" for i in range(ns.batch)]
    reports = []
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            model = build_diffusers_model(
                "auto",
                build(family, Path(tmp), ns),
                resolution=size,
                dtype="float32",
                device="cpu",
                max_sequence_length=ns.seq,
            )
        params = sum(p.numel() for p in model.module.parameters())
        gs = (1.0, GUIDANCE[family])
        results = [bench(model, family, prompts, ns.steps, g, ns.repeats, ns.seq) for g in gs]
        reports.append(
            {
                "family": family,
                "pipeline": type(model.pipe).__name__,
                "transformer_params": params,
                "resolution": list(size),
                "latent_shape": list(model.latent_shape(ns.batch)),
                "results": results,
            }
        )
        print(
            f"{type(model.pipe).__name__}: transformer {params / 1e6:.3f} M params, "
            f"{size[0]}x{size[1]} px, {ns.steps} steps, batch {ns.batch}, {ns.threads} threads, "
            f"{ns.repeats} paired rounds"
        )
        print(f"{'guidance':>8} {'run':>10} {'median s':>9} {'img/s':>7} {'pipeline/ours':>13}")
        for r in results:
            for name, t in r["median_s"].items():
                ratio = r["throughput_ratio"].get(name)
                print(
                    f"{r['guidance_scale']:>8} {name:>10} {t:>9.3f} "
                    f"{r['images_per_s'][name]:>7.1f} {'' if ratio is None else f'{ratio:.2f}':>13}"
                )
            diff = r["max_abs_latent_diff_vs_pipeline"]
            print(f"{'':>8} latent max |ours - pipeline| = {diff:.2e}")
    report = {
        "steps": ns.steps,
        "batch": ns.batch,
        "repeats": ns.repeats,
        "threads": ns.threads,
        "device": "cpu",
        "machine": platform.platform(),
        "torch": torch.__version__,
        "models": reports,
    }
    if ns.family == "sd3":
        report["model"] = {"layers": ns.layers, "width": ns.heads * ns.head_dim}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
