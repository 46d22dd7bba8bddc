"""How fast the ODE solvers approach the sampler's many-step limit (``sampler.solver``).

For each model, from the same initial noise and conditions, the final latents of the Euler
solver and of the second-order multistep DPM-Solver++ (``dpm2``, DiffusionNFT's sampler) at
N steps are compared with the limit of the Euler solver: the Richardson extrapolation
``2·Euler(2R) − Euler(R)`` of Euler at R and 2R steps (R = 500 by default), which is the
exact ODE solution up to O(1/R²) and uses no code of the solver under test. The error is the
relative RMS ``‖x_N − x_ref‖ / ‖x_ref‖`` over the batch; the observed order is minus the
slope of a least-squares fit of log(error) against log(N). The plain Euler(2R) error is
printed too, so the reference's own accuracy is in view.

Cases (CPU, float32, about a minute on one thread):

* ``tiny_sd3``: the tiny random SD3 pipeline of the tests (``tests/tiny_pipelines.py``,
  32 px, shift 3) on its pipeline's own schedule, what ``flowdppo sample`` runs. Its last
  level before 0 is sigma = 0.009 at any N, and its velocity oscillates in sigma with the
  timestep embedding's fastest sinusoid (a random network; a period of 0.006 in sigma);
* ``tiny_sd3_smooth``: the same with the embedding's sinusoids above 10 rad per unit
  sigma removed (``smooth_in_sigma``: a velocity smooth in sigma, as a trained one is);
* ``tiny_sd3_smooth_to_0``: that model on SD3's shift-3 schedule without the stop at
  0.009 (the levels run evenly to 0 before the shift), the case of ``tests/test_solvers.py``;
* ``digits``: the digits task's shipped base model (``flowdppo.tasks``, 8x8, shift 1) on
  its run's schedule (evenly spaced to 0).
* ``gaussian_exact``: no network: Gaussian data and its exact velocity, on the SD3
  pipeline's schedule (shift 3, last level 0.009 before 0).

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

from flowdppo import schedule  # noqa: E402
from flowdppo.config import Config  # noqa: E402
from flowdppo.models.base import FlowModel  # noqa: E402
from flowdppo.trainer.loop import make_sampler_spec  # noqa: E402
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, sample  # noqa: E402

DEFAULT_OUT = ROOT / "docs/results/solver_convergence/solver_convergence.json"


def run_sigmas(model, steps: int) -> torch.Tensor:
    """The schedule a run of this model samples on with ``steps`` steps."""
    cfg = Config()
    cfg.sampler.num_steps = steps
    nt = getattr(model, "num_train_timesteps", None)
    return make_sampler_spec(cfg, model.shift, nt, model).sigmas


def to_zero_sigmas(model, steps: int) -> torch.Tensor:
    """The model's shift on levels evenly spaced from 1 to 0."""
    return schedule.sigma_schedule(steps, model.shift)


def final_latents(model, cond, noise, sigmas: torch.Tensor, solver: str) -> torch.Tensor:
    """The all-deterministic sampler's final latents on ``sigmas`` with ``solver``."""
    spec = SamplerSpec("flow", sigmas, 0.7, solver=solver)
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


def convergence(
    model, prompts: list[str], sigmas_of, steps: list[int], reference: int, seed: int
) -> dict:
    cond = model.encode(prompts)
    noise = model.initial_noise(len(prompts), torch.Generator().manual_seed(seed))

    def final(n: int, solver: str) -> torch.Tensor:
        return final_latents(model, cond, noise, sigmas_of(model, n), solver)

    with torch.no_grad():
        coarse, fine = final(reference, "euler"), final(2 * reference, "euler")
        ref = 2 * fine - coarse

        def error(x: torch.Tensor) -> float:
            return float((x - ref).norm() / ref.norm())

        rows = [
            {"steps": n, "euler": error(final(n, "euler")), "dpm2": error(final(n, "dpm2"))}
            for n in steps
        ]
    return {
        "rows": rows,
        "order_euler": observed_order(steps, [r["euler"] for r in rows]),
        "order_dpm2": observed_order(steps, [r["dpm2"] for r in rows]),
        "last_sigma_before_0": float(sigmas_of(model, steps[0])[-2]) if steps else None,
        "reference": f"2*Euler({2 * reference}) - Euler({reference})",
        "euler_at_2R_error": error(fine),
        "prompts": prompts,
        "seed": seed,
    }


def tiny_sd3(tmp: Path, smooth: bool = False):
    from tiny_pipelines import build_sd3, smooth_in_sigma

    from flowdppo.models.diffusers_adapters import build_diffusers_model

    path = tmp / "sd3"
    if not path.is_dir():
        build_sd3(path)
    model = build_diffusers_model(
        "sd3", path, resolution=32, dtype="float32", device="cpu", max_sequence_length=16
    )
    if smooth:
        smooth_in_sigma(model.module)
    return model, ["a red cat", "two dogs on grass"]


def digits(tmp: Path):
    from flowdppo.tasks import get_task

    task = get_task("digits")
    return task.build_model(None), list(task.train_prompts)


class GaussianExact(FlowModel):
    """Data N(m, s²) per element and its exact velocity on SD3's schedule (shift 3, the
    pipeline's spacing with 1,000 training timesteps): no network at all, so what a solver
    does on that schedule shows without any property of a model."""

    shift = 3.0
    num_train_timesteps = 1000

    def __init__(self, mean: float = 0.5, std: float = 0.5):
        self.mean, self.std = mean, std

    def encode(self, prompts):
        return {}

    def initial_noise(self, n, generator):
        return torch.randn(n, 4, 8, 8, generator=generator)

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        s = sigma.double().view(-1, *([1] * (x.dim() - 1)))
        a, x64 = 1 - s, x.double()
        x0 = self.mean + a * self.std**2 / (a**2 * self.std**2 + s**2) * (x64 - a * self.mean)
        return ((x64 - x0) / s).float()

    def decode(self, x):
        return x


def gaussian(tmp: Path):
    return GaussianExact(), ["", ""]


#: name -> (model builder, schedule)
CASES = {
    "tiny_sd3": (tiny_sd3, run_sigmas),
    "tiny_sd3_smooth": (lambda tmp: tiny_sd3(tmp, smooth=True), run_sigmas),
    "tiny_sd3_smooth_to_0": (lambda tmp: tiny_sd3(tmp, smooth=True), to_zero_sigmas),
    "digits": (digits, run_sigmas),
    "gaussian_exact": (gaussian, run_sigmas),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help=f"JSON (default {DEFAULT_OUT})")
    p.add_argument("--steps", default="4,8,10,16,32,64", help="step counts (default 4,8,10,...,64)")
    p.add_argument("--reference", type=int, default=500, help="R of the reference (default 500)")
    p.add_argument("--cases", default=",".join(CASES), help=f"default {','.join(CASES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    steps = [int(s) for s in ns.steps.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ns.cases.split(","):
            start = time.perf_counter()
            build, sigmas_of = CASES[name]
            model, prompts = build(Path(tmp))
            res = convergence(model, prompts, sigmas_of, steps, ns.reference, ns.seed)
            res["seconds"] = round(time.perf_counter() - start, 1)
            results[name] = res
            print(
                f"{name}: relative RMS error of the final latents to {res['reference']} "
                f"(last level before 0 at N = {steps[0]}: {res['last_sigma_before_0']:.4f})"
            )
            print(f"  {'N':>4} {'euler':>10} {'dpm2':>10} {'euler/dpm2':>10}")
            for r in res["rows"]:
                ratio = r["euler"] / r["dpm2"]
                print(f"  {r['steps']:>4} {r['euler']:>10.3e} {r['dpm2']:>10.3e} {ratio:>10.2f}")
            print(
                f"  observed order (log-log fit): euler {res['order_euler']:.2f}, "
                f"dpm2 {res['order_dpm2']:.2f}; Euler({2 * ns.reference}) itself "
                f"{res['euler_at_2R_error']:.1e}; {res['seconds']} s",
                flush=True,
            )
    write_record(ns.out, "solver_convergence", ns.threads, steps=steps, cases=results)


def write_record(out: str | Path, benchmark: str, threads: int, **fields) -> None:
    """The benchmark's JSON: its name, the machine, torch, threads, then ``fields``."""
    record = {
        "benchmark": benchmark,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": threads,
        **fields,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
