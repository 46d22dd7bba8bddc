"""Peak memory of a rollout against model.forward_batch_size, group size and video frames,
and of an update against train.micro_batch, on small random transformers; then an estimate
for the real shapes.

Each point runs in a fresh process, so one point's peak cannot hide another's: on a CPU the
peak is the growth of the process's maximum resident set (``ru_maxrss``) over what loading
the model reached; on a GPU it is ``torch.cuda.max_memory_allocated`` over the memory held
before the run. A rollout of B samples records 3 latents per SDE step and sample, which
grows with B whatever the forward batch; the network's activations are what
``forward_batch_size`` bounds.

    python benchmarks/memory.py                    # about 3 minutes on 2 CPU cores
    python benchmarks/memory.py --device cuda      # the same points on a GPU
    python benchmarks/memory.py --out docs/results/memory.json

The estimate table scales the measured activation bytes per token and per unit of width
(from the largest unsplit rollout point) to each real shape in bf16. It is arithmetic, not
a measurement: it assumes activations linear in tokens x width (true of flash / memory-
efficient attention, which stores no score matrix; the CPU's SDPA kernel here is a flash
kernel too) and ignores the MLP's wider intermediate, so read it to within a factor of 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from random_transformers import SHAPES, RandomTransformer  # noqa: E402

# Small enough for a CPU, big enough that activations are tens of MB: SD3 layout at 512 px
# (1024 tokens, width 256), Wan layout at 256 px (256 tokens per latent frame, width 128).
IMAGE = dict(
    name="sd35m",
    resolution=512,
    overrides=dict(
        num_attention_heads=4,
        attention_head_dim=64,
        caption_projection_dim=256,
        pos_embed_max_size=64,
    ),
)
VIDEO = dict(
    name="wan21-1.3b",
    resolution=256,
    overrides=dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=256),
)
STEPS, SDE_STEPS = 4, 2


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux


def point(spec: dict) -> dict:
    """One measurement (runs in its own process)."""
    from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, sample

    torch.set_num_threads(1)
    device = spec["device"]
    base = VIDEO if spec["frames"] > 1 else IMAGE
    model = RandomTransformer(
        base["name"],
        base["resolution"],
        frames=spec["frames"],
        tiny=True,
        device=device,
        overrides=base["overrides"],
    )
    model.forward_batch_size = spec["forward_batch_size"]
    n = spec["samples"]
    cond = model.encode(["p"] * n)
    noise = model.initial_noise(n, torch.Generator().manual_seed(0))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak_bytes(device) if not device.startswith("cuda") else torch.cuda.memory_allocated()
    if spec["mode"] == "rollout":
        sigmas = torch.linspace(1, 0, STEPS + 1)
        run = SamplerSpec("flow", sigmas, 0.7, spec["guidance"])
        gen = torch.Generator().manual_seed(1)
        sample(model, cond, noise, run, list(range(SDE_STEPS)), gen, ForwardCounter())
    else:  # update: forward and backward of one trained step, in micro-batches
        model.module.requires_grad_(True)
        micro = spec["micro_batch"] or n
        for start in range(0, n, micro):
            v = model.velocity(
                noise[start : start + micro],
                torch.tensor(0.5),
                {k: c[start : start + micro] for k, c in cond.items()},
            )
            (v.square().mean() * v.shape[0] / n).backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = _peak_bytes(device) - before
    return {
        **spec,
        "tokens_per_sample": model.tokens(),
        "width": model.module.config.num_attention_heads * model.module.config.attention_head_dim,
        "peak_bytes": max(peak, 0),
    }


def points(device: str, quick: bool) -> list[dict]:
    base = dict(device=device, mode="rollout", frames=1, guidance=1.0, micro_batch=None)
    groups = (2, 4) if quick else (2, 4, 8, 16)
    out = []
    for fbs in (None, 2):
        for g in groups:
            out.append({**base, "samples": g, "forward_batch_size": fbs, "axis": "group_size"})
    for fbs in (None, 1):
        for frames in (1, 5) if quick else (5, 9, 13, 17):
            out.append(
                {
                    **base,
                    "samples": 2,
                    "frames": frames,
                    "forward_batch_size": fbs,
                    "axis": "frames",
                }
            )
    for micro in (None, 2):
        for g in groups:
            out.append(
                {
                    **base,
                    "mode": "update",
                    "samples": g,
                    "forward_batch_size": None,
                    "micro_batch": micro,
                    "axis": "micro_batch",
                }
            )
    return out


def run_point(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--point", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


#: What the estimate covers: one rollout forward of a stated batch (Wan: the 32 videos at
#: 480 x 832 x 81 of the issue that asked for this), guidance doubling the rows.
REAL = {
    "sd35m": dict(resolution=512, frames=1, samples=24, guidance=4.5),
    "flux2-klein-4b": dict(resolution=1024, frames=1, samples=16, guidance=1.0),
    "flux2-klein-9b": dict(resolution=1024, frames=1, samples=16, guidance=1.0),
    "wan21-1.3b": dict(resolution=480, frames=81, samples=32, guidance=5.0, height=832),
}


def estimate(per_token_width: float) -> list[dict]:
    """Peak rollout activations of each real shape in bf16 from the measured fp32 bytes per
    token and unit of width (an estimate, see the module docstring)."""
    rows = []
    for name, r in REAL.items():
        shape = SHAPES[name]
        cfg = shape.config
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        h, w = r["resolution"], r.get("height", r["resolution"])
        cells = (h // shape.vae_factor) * (w // shape.vae_factor)
        if shape.video:
            tokens = ((r["frames"] - 1) // 4 + 1) * cells // 4
        else:
            tokens = cells // (4 if cfg.get("patch_size") == 2 else 1)
        rows_per_sample = 2 if r["guidance"] != 1.0 else 1
        per_sample = per_token_width * width * tokens * rows_per_sample / 2  # bf16: half
        rows.append(
            {
                "model": name,
                "tokens_per_sample": tokens,
                "samples": r["samples"],
                "guidance_rows": rows_per_sample,
                "estimate_gb_one_forward": per_sample * r["samples"] / 1e9,
                "estimate_gb_forward_batch_1": per_sample / 1e9,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--point", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer points")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.point:
        print(json.dumps(point(json.loads(args.point))))
        return
    results = []
    for spec in points(args.device, args.quick):
        r = run_point(spec)
        results.append(r)
        print(
            f"{r['axis']:>11} {r['mode']:>7} samples {r['samples']:>2} frames {r['frames']:>2} "
            f"forward_batch {r['forward_batch_size']!s:>4} micro {r['micro_batch']!s:>4}: "
            f"peak +{r['peak_bytes'] / 2**20:7.1f} MiB",
            flush=True,
        )
    unsplit = [r for r in results if r["axis"] == "group_size" and r["forward_batch_size"] is None]
    # Slope between the smallest and largest unsplit rollout: bytes per (token x width).
    lo, hi = unsplit[0], unsplit[-1]
    d_tokens = (hi["samples"] - lo["samples"]) * hi["tokens_per_sample"] * hi["width"]
    per_token_width = (hi["peak_bytes"] - lo["peak_bytes"]) / d_tokens
    table = estimate(per_token_width)
    print(f"\nmeasured: {per_token_width:.2f} bytes per token x width unit (fp32, no gradient)")
    print("ESTIMATE (arithmetic, not measured) of one rollout forward's activations in bf16:")
    for row in table:
        print(
            f"  {row['model']:>15}: {row['samples']} samples x {row['tokens_per_sample']} tokens "
            f"x {row['guidance_rows']} rows: {row['estimate_gb_one_forward']:.1f} GB in one "
            f"forward, {row['estimate_gb_forward_batch_1']:.2f} GB at forward_batch_size=1"
        )
    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "device": args.device,
        "points": results,
        "bytes_per_token_width": per_token_width,
        "estimate": table,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
