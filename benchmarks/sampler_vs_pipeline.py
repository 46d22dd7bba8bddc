"""Our rollout sampler against each family's own pipeline ``__call__``, paired timings.

For every family, one tiny random pipeline (built offline, ``tests/tiny_pipelines*.py``)
at one shared size, the same steps, batch and guidance for both sides; the pipeline
returns latents (``output_type="latent"``, no VAE decode). Timed per repeat, in an order
that alternates between repeats (interleaved pairs), after one warm-up run of each:

* ``pipeline``: ``pipe(prompts, ..., output_type="latent")`` (encodes its prompts each call)
* ``ours_cold``: prompt cache cleared, then ``encode`` + ``sample`` (all ODE)
* ``ours_warm``: ``sample`` with cached prompt encodings (the trainer's steady state)
* ``ours_sde``: ``rollout`` with 3 recorded SDE steps (what one training rollout costs)

Reported: the median time of each, and per run the **median of the per-repeat ratios**
pipeline time / ours time of the same repeat (> 1: ours is faster), with their min and
max, so load that changes between repeats cancels within a pair. It also checks that the
all-ODE latents equal the pipeline's.

    python benchmarks/sampler_vs_pipeline.py                         # every family
    python benchmarks/sampler_vs_pipeline.py --families wan22_a14b hunyuan_video15 \\
        --repeats 7 --threads 1 --out docs/results/sampler_vs_pipeline_video.json
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

import tiny_pipelines  # noqa: E402
import tiny_pipelines_video  # noqa: E402

from flowdppo.models.diffusers_adapters import build_diffusers_model  # noqa: E402
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout, sample  # noqa: E402

#: name: (adapter kind, builder, guided scale, image or video). Videos share one size:
#: 32 x 64 px (a multiple of every video VAE x patch here), 5 frames.
FAMILIES = {
    "sd3": ("sd3", tiny_pipelines.build_sd3, 4.5, "image"),
    "wan22_a14b": ("wan", tiny_pipelines_video.build_wan22_a14b, 4.0, "video"),
    "wan22_ti2v": ("wan", tiny_pipelines_video.build_wan22_ti2v, 4.0, "video"),
    "hunyuan_video15": (
        "hunyuan_video15",
        tiny_pipelines_video.build_hunyuan_video15,
        4.0,
        "video",
    ),
}
VIDEO_SIZE, FRAMES = (32, 64), 5


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pipeline_call(model, name: str, prompts, steps: int, guidance: float, seq: int, noise):
    kw: dict = dict(
        height=model.height,
        width=model.width,
        num_inference_steps=steps,
        latents=noise,
        output_type="latent",
    )
    if name == "hunyuan_video15":
        from diffusers import ClassifierFreeGuidance

        model.pipe.guider = ClassifierFreeGuidance(guidance_scale=guidance)
    else:
        kw.update(guidance_scale=guidance, max_sequence_length=seq)
    if FAMILIES[name][3] == "video":
        kw["num_frames"] = FRAMES
        return model.pipe(prompts, **kw).frames
    return model.pipe(prompts, **kw).images


def bench(model, name, prompts, steps, guidance, repeats, seq) -> dict:
    spec = SamplerSpec("flow", model.sigmas(steps), eta=0.0, guidance_scale=guidance)
    sde_spec = SamplerSpec("flow", model.sigmas(steps), eta=0.7, guidance_scale=guidance)
    group = torch.arange(len(prompts))
    n = len(prompts)

    def noise():
        return model.initial_noise(n, torch.Generator().manual_seed(0))

    def pipeline():
        return pipeline_call(model, name, prompts, steps, guidance, seq, noise())

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
    runs = {"pipeline": pipeline, "ours_cold": ours_cold, "ours_warm": ours_warm}
    runs["ours_sde"] = ours_sde
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            timed(fn)
        for rep in range(repeats):
            order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
            for run in order:
                times[run].append(timed(runs[run]))
    ratios = {
        k: [p / o for p, o in zip(times["pipeline"], times[k], strict=True)]
        for k in runs
        if k != "pipeline"
    }
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "guidance_scale": guidance,
        "max_abs_latent_diff_vs_pipeline": diff,
        "median_s": med,
        "samples_per_s": {k: n / v for k, v in med.items()},
        "paired_ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
        "paired_ratio_min": {k: min(v) for k, v in ratios.items()},
        "paired_ratio_max": {k: max(v) for k, v in ratios.items()},
    }


def load(name: str, tmp: Path, ns):
    kind, build, _, media = FAMILIES[name]
    if name == "sd3":
        path = build(tmp / name, layers=ns.layers, heads=ns.heads, head_dim=ns.head_dim)
    else:
        path = build(tmp / name)
    video = {"frames": FRAMES} if media == "video" else {}
    return build_diffusers_model(
        kind,
        path,
        resolution=VIDEO_SIZE if media == "video" else ns.resolution,
        dtype="float32",
        device="cpu",
        max_sequence_length=ns.seq,
        **video,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--resolution", type=int, default=64, help="image families' pixels")
    ap.add_argument("--layers", type=int, default=4, help="SD3's transformer layers")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32, help="max_sequence_length (text tokens)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/sampler_vs_pipeline.json")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    prompts = [f"prompt number {i}" for i in range(ns.batch)]
    families = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ns.families:
            model = load(name, Path(tmp), ns)
            guided = FAMILIES[name][2]
            families[name] = {
                "transformer_params": sum(p.numel() for p in model.module.parameters()),
                "latent_shape": list(model.latent_shape(ns.batch)),
                "results": [
                    bench(model, name, prompts, ns.steps, g, ns.repeats, ns.seq)
                    for g in (1.0, guided)
                ],
            }
    report = {
        "families": families,
        "random_weights": True,
        "steps": ns.steps,
        "batch": ns.batch,
        "repeats": ns.repeats,
        "threads": ns.threads,
        "device": "cpu",
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"{ns.steps} steps, batch {ns.batch}, {ns.threads} threads, {ns.repeats} paired repeats")
    print(f"{'family':>16} {'g':>4} {'run':>10} {'median s':>9} {'pipeline/ours [min, max]':>26}")
    for name, fam in families.items():
        for r in fam["results"]:
            for run, t in r["median_s"].items():
                ratio = ""
                if run != "pipeline":
                    lo, hi = r["paired_ratio_min"][run], r["paired_ratio_max"][run]
                    ratio = f"{r['paired_ratio_median'][run]:.2f} [{lo:.2f}, {hi:.2f}]"
                print(f"{name:>16} {r['guidance_scale']:>4} {run:>10} {t:>9.3f} {ratio:>26}")
            diff = r["max_abs_latent_diff_vs_pipeline"]
            print(f"{'':>16} latent max |ours - pipeline| = {diff:.2e}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
