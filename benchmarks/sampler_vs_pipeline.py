"""Our rollout sampler against ``StableDiffusion3Pipeline.__call__`` on one SD3 model.

Same random SD3 model (built offline, see ``tests/tiny_pipelines.py``), resolution, steps,
batch and guidance for both; the pipeline returns latents (``output_type="latent"``, no
VAE decode). Reported per configuration, as the median of ``--repeats`` timed runs after
one warm-up run, alternating the order:

* ``pipeline``: ``pipe(prompts, ..., output_type="latent")`` (encodes its prompts each call)
* ``ours_cold``: prompt cache cleared, then ``encode`` + ``sample`` (all ODE)
* ``ours_warm``: ``sample`` with cached prompt encodings (the trainer's steady state)
* ``ours_sde``: ``rollout`` with 3 recorded SDE steps (what one training rollout costs)

and ``throughput_ratio`` = pipeline time / ours time (> 1: ours is faster). It also
checks that the all-ODE latents equal the pipeline's.

    python benchmarks/sampler_vs_pipeline.py                 # about a minute on 2 CPU cores
    python benchmarks/sampler_vs_pipeline.py --layers 2 --resolution 32 --repeats 3
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

from tiny_pipelines import build_sd3  # noqa: E402

from flowdppo.models.diffusers_adapters import build_diffusers_model  # noqa: E402
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout, sample  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(model, prompts: list[str], steps: int, guidance: float, repeats: int, seq: int) -> dict:
    spec = SamplerSpec("flow", model.sigmas(steps), eta=0.0, guidance_scale=guidance)
    sde_spec = SamplerSpec("flow", model.sigmas(steps), eta=0.7, guidance_scale=guidance)
    group = torch.arange(len(prompts))
    n = len(prompts)

    def noise():
        return model.initial_noise(n, torch.Generator().manual_seed(0))

    def pipeline():
        return model.pipe(
            prompts,
            height=model.height,
            width=model.width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise(),
            output_type="latent",
            max_sequence_length=seq,
        ).images

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
    return {
        "guidance_scale": guidance,
        "max_abs_latent_diff_vs_pipeline": diff,
        "median_s": med,
        "images_per_s": {k: n / v for k, v in med.items()},
        "throughput_ratio": {k: med["pipeline"] / med[k] for k in med if k != "pipeline"},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32, help="T5 max_sequence_length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/sampler_vs_pipeline.json")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_sd3(Path(tmp) / "sd3", layers=ns.layers, heads=ns.heads, head_dim=ns.head_dim)
        model = build_diffusers_model(
            "sd3",
            path,
            resolution=ns.resolution,
            dtype="float32",
            device="cpu",
            max_sequence_length=ns.seq,
        )
    params = sum(p.numel() for p in model.module.parameters())
    prompts = [f"prompt number {i}" for i in range(ns.batch)]
    results = [bench(model, prompts, ns.steps, g, ns.repeats, ns.seq) for g in (1.0, 4.5)]
    report = {
        "model": {
            "kind": "sd3 (random weights)",
            "transformer_params": params,
            "layers": ns.layers,
            "width": ns.heads * ns.head_dim,
            "resolution": ns.resolution,
            "latent_shape": list(model.latent_shape(ns.batch)),
        },
        "steps": ns.steps,
        "batch": ns.batch,
        "repeats": ns.repeats,
        "threads": ns.threads,
        "device": "cpu",
        "machine": platform.platform(),
        "torch": torch.__version__,
        "results": results,
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(
        f"SD3 transformer {params / 1e6:.2f} M params, {ns.resolution} px, {ns.steps} steps, "
        f"batch {ns.batch}, {ns.threads} threads, median of {ns.repeats}"
    )
    print(f"{'guidance':>8} {'run':>10} {'median s':>9} {'img/s':>7} {'pipeline/ours':>13}")
    for r in results:
        for name, t in r["median_s"].items():
            ratio = r["throughput_ratio"].get(name)
            print(
                f"{r['guidance_scale']:>8} {name:>10} {t:>9.3f} {r['images_per_s'][name]:>7.1f} "
                f"{'' if ratio is None else f'{ratio:.2f}':>13}"
            )
        print(f"{'':>8} latent max |ours - pipeline| = {r['max_abs_latent_diff_vs_pipeline']:.2e}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
