"""How fast the ODE solvers approach the sampler's many-step limit (``sampler.solver``).

For each model, from the same initial noise and conditions, the final latents of the Euler
solver and of the second-order multistep DPM-Solver++ (``dpm2``, DiffusionNFT's sampler) at
N steps are compared with the limit of the Euler solver: the Richardson extrapolation
``2·Euler(2R) − Euler(R)`` of Euler at R and 2R steps (R = 500 by default), which is the
exact ODE solution up to O(1/R²) and uses no code of the solver under test. The error is the
relative RMS ``‖x_N − x_ref‖ / ‖x_ref‖`` over the batch; the observed order is minus the
slope of a least-squares fit of log(error) against log(N). The plain Euler(2R) error is
printed too, so the reference's own accuracy is in view.

Models: the tiny random SD3 pipeline of the tests (``tests/tiny_pipelines.py``, 32 px,
shift 3, the pipeline's own schedule) and the digits task's shipped base model
(``flowdppo.tasks``, 8x8, shift 1). CPU, float32, about a minute on one thread.

    python benchmarks/solver_convergence.py
    python benchmarks/solver_convergence.py --steps 2,4,8,16,32,64 --reference 1000 out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from flowdppo.config import Config  # noqa: E402
from flowdppo.trainer.loop import make_sampler_spec  # noqa: E402
from flowdppo.trainer.rollout import ForwardCounter, sample  # noqa: E402

DEFAULT_OUT = ROOT / "docs/results/solver_convergence/solver_convergence.json"


def final_latents(model, cond, noise: torch.Tensor, steps: int, solver: str) -> torch.Tensor:
    """The all-deterministic sampler's final latents with ``steps`` steps of ``solver``,
    on the schedule a run of this model samples on (``make_sampler_spec``)."""
    cfg = Config()
    cfg.sampler.num_steps = steps
    cfg.sampler.solver = solver
    spec = make_sampler_spec(cfg, model.shift, getattr(model, "num_train_timesteps", None), model)
    final, _ = sample(model, cond, noise, spec, [], torch.Generator(), ForwardCounter())
    return final


def observed_order(steps: list[int], errors: list[float]) -> float:
    """Minus the least-squares slope of log(error) against log(steps)."""
    xs = [math.log(n) for n in steps]
    ys = [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return -slope


def convergence(model, prompts: list[str], steps: list[int], reference: int, seed: int) -> dict:
    cond = model.encode(prompts)
    noise = model.initial_noise(len(prompts), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        coarse = final_latents(model, cond, noise, reference, "euler")
        fine = final_latents(model, cond, noise, 2 * reference, "euler")
        ref = 2 * fine - coarse

        def error(x: torch.Tensor) -> float:
            return float((x - ref).norm() / ref.norm())

        rows = [
            {
                "steps": n,
                "euler": error(final_latents(model, cond, noise, n, "euler")),
                "dpm2": error(final_latents(model, cond, noise, n, "dpm2")),
            }
            for n in steps
        ]
    out = {
        "rows": rows,
        "order_euler": observed_order(steps, [r["euler"] for r in rows]),
        "order_dpm2": observed_order(steps, [r["dpm2"] for r in rows]),
        "reference": f"2*Euler({2 * reference}) - Euler({reference})",
        "euler_at_2R_error": error(fine),
        "prompts": prompts,
        "seed": seed,
    }
    return out


def tiny_sd3(tmp: Path):
    from tiny_pipelines import build_sd3

    from flowdppo.models.diffusers_adapters import build_diffusers_model

    path = build_sd3(tmp / "sd3")
    model = build_diffusers_model(
        "sd3", path, resolution=32, dtype="float32", device="cpu", max_sequence_length=16
    )
    return model, ["a red cat", "two dogs on grass"]


def digits(tmp: Path):
    from flowdppo.tasks import get_task

    task = get_task("digits")
    return task.build_model(None), list(task.train_prompts)


MODELS = {"tiny_sd3": tiny_sd3, "digits": digits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help=f"JSON (default {DEFAULT_OUT})")
    p.add_argument("--steps", default="4,8,16,32", help="step counts N (default 4,8,16,32)")
    p.add_argument("--reference", type=int, default=500, help="R of the reference (default 500)")
    p.add_argument("--models", default=",".join(MODELS), help="tiny_sd3,digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    steps = [int(s) for s in ns.steps.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ns.models.split(","):
            start = time.perf_counter()
            model, prompts = MODELS[name](Path(tmp))
            res = convergence(model, prompts, steps, ns.reference, ns.seed)
            res["seconds"] = round(time.perf_counter() - start, 1)
            results[name] = res
            print(f"{name}: relative RMS error of the final latents to {res['reference']}")
            print(f"  {'N':>4} {'euler':>10} {'dpm2':>10} {'euler/dpm2':>10}")
            for r in res["rows"]:
                ratio = r["euler"] / r["dpm2"]
                print(f"  {r['steps']:>4} {r['euler']:>10.3e} {r['dpm2']:>10.3e} {ratio:>10.1f}")
            print(
                f"  observed order (log-log fit): euler {res['order_euler']:.2f}, "
                f"dpm2 {res['order_dpm2']:.2f}; Euler({2 * ns.reference}) itself "
                f"{res['euler_at_2R_error']:.1e}; {res['seconds']} s"
            )
    record = {
        "benchmark": "solver_convergence",
        "steps": steps,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": ns.threads,
        "models": results,
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
