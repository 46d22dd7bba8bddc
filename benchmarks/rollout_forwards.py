"""Rollout error per forward: a coarse grid for the deterministic steps (``sampler.ode_stride``,
``sampler.solver``) against today's rollout, and what shared prefixes save
(``sampler.shared_prefix``).

For a built-in task's shipped base model, its run's schedule (``sampler.num_steps`` = 10,
the model's shift) and SDE steps as the trainer draws them (3 of the first half: every
choice once, or ``--draws`` random ones), every variant samples the same prompts from the
same initial noise with the same SDE noise (the SDE steps draw in the same order whatever
the deterministic grid). The
reference is the same trajectory with each deterministic interval of the schedule split
into R and 2R Euler sub-steps and Richardson-extrapolated (``2·fine(2R) − fine(R)``), the
SDE steps being the training schedule's own transitions in all of them: the exact sample
that the trained transitions lead to, up to O(1/R²). The error is the relative RMS
``‖x − x_ref‖ / ‖x_ref‖`` of the final latents, averaged over the choices of SDE steps;
forwards are counted by the sampler's own counter (per sample). A shared prefix changes
no sample's path, only who computes it: its forwards per sample (group of the task's
recommended size) are listed beside.

    python benchmarks/rollout_forwards.py                       # digits, shapes, text
    python benchmarks/rollout_forwards.py --tasks text --draws 4 --reference 64 out.json
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from solver_convergence import write_record

from flowdppo import schedule
from flowdppo.config import Config
from flowdppo.tasks import get_task
from flowdppo.trainer.loop import make_sampler_spec
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout, sample

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs/results/rollout_forwards/rollout_forwards.json"
#: (solver, ode_stride): today's rollout first.
VARIANTS = [(s, k) for k in (1, 2, 3, 5) for s in ("euler", "dpm2")]


@dataclass
class _SigmaMax(SamplerSpec):
    """A spec on a refined grid whose flow kernel at sigma = 1 keeps the training
    schedule's ``sigma_max`` (the refined grid's second level is another)."""

    fixed_sigma_max: float = 0.5

    @property
    def sigma_max(self) -> float:
        return self.fixed_sigma_max


def refined(spec: SamplerSpec, sde_steps: list[int], r: int) -> tuple[SamplerSpec, list[int]]:
    """``spec`` with every deterministic interval split into ``r`` equal sub-steps in sigma
    and the SDE steps' indices on the new grid."""
    levels, steps = [spec.sigmas[:1]], []
    for k in range(spec.num_steps):
        a, b = spec.sigmas[k], spec.sigmas[k + 1]
        if k in sde_steps:
            steps.append(sum(len(t) for t in levels) - 1)
            levels.append(b.reshape(1))
        else:
            levels.append(torch.linspace(float(a), float(b), r + 1, dtype=torch.float64)[1:])
    sigmas = torch.cat([t.float() for t in levels])
    out = _SigmaMax(spec.kernel, sigmas, spec.eta, fixed_sigma_max=spec.sigma_max)
    return out, steps


def measure(task_name: str, samples: int, draws: int | None, r: int, seed: int) -> dict:
    task = get_task(task_name)
    model = task.build_model(None)
    cfg = Config(task=task_name)
    spec = make_sampler_spec(cfg, model.shift, getattr(model, "num_train_timesteps", None), model)
    s = cfg.sampler
    pool = list(task.train_prompts)
    prompts = [pool[i % len(pool)] for i in range(samples)]
    cond = model.encode(prompts)
    group = int(task.extra.get("recommended", {}).get("train", {}).get("group_size", 0))
    group = group or cfg.train.group_size
    if draws is None:  # every draw the trainer can make, each as likely: the exact mean
        window = schedule.sde_window_steps(s.num_steps, s.sde_window)
        choices = [list(c) for c in itertools.combinations(window, s.num_sde_steps)]
    else:
        draw_gen = torch.Generator().manual_seed(seed)
        choices = [
            schedule.choose_sde_steps(s.num_steps, s.num_sde_steps, s.sde_window, draw_gen)
            for _ in range(draws)
        ]
    errors: dict[str, list[float]] = {f"{v}/{k}": [] for v, k in VARIANTS}
    forwards: dict[str, list[float]] = {key: [] for key in errors}
    shared: dict[str, list[float]] = {key: [] for key in errors}
    reference_gap = []
    drawn = []
    for d, steps in enumerate(choices):
        drawn.append(steps)
        noise = model.initial_noise(samples, torch.Generator().manual_seed(seed + 1 + d))
        start = (model, cond, noise, seed + 1000 + d)
        with torch.no_grad():
            coarse = final(*start, *refined(spec, steps, r))
            fine = final(*start, *refined(spec, steps, 2 * r))
            ref = 2 * fine - coarse
            reference_gap.append(float((fine - ref).norm() / ref.norm()))
            for solver, stride in VARIANTS:
                key = f"{solver}/{stride}"
                counter = ForwardCounter()
                sp = SamplerSpec(spec.kernel, spec.sigmas, s.eta, solver=solver, ode_stride=stride)
                x = final(*start, sp, steps, counter)
                errors[key].append(float((x - ref).norm() / ref.norm()))
                forwards[key].append(counter.samples["rollout"] / samples)
                shared[key].append(shared_forwards(model, pool, sp, steps, group))
    rows = [
        {
            "solver": solver,
            "ode_stride": stride,
            "error": _mean(errors[f"{solver}/{stride}"]),
            "forwards_per_sample": _mean(forwards[f"{solver}/{stride}"]),
            "shared_prefix_forwards_per_sample": _mean(shared[f"{solver}/{stride}"]),
        }
        for solver, stride in VARIANTS
    ]
    return {
        "rows": rows,
        "shift": model.shift,
        "num_steps": s.num_steps,
        "sde_steps_drawn": drawn,
        "group_size": group,
        "samples": samples,
        "reference": f"2*fine({2 * r}) - fine({r}) sub-steps per deterministic interval",
        "fine_2R_error": _mean(reference_gap),
        "seed": seed,
    }


def final(model, cond, noise, sde_seed: int, spec, sde_steps, counter=None) -> torch.Tensor:
    """The final latents; the SDE steps draw their noise from ``sde_seed``, in step order
    on any grid."""
    gen = torch.Generator().manual_seed(sde_seed)
    return sample(model, cond, noise, spec, sde_steps, gen, counter or ForwardCounter())[0]


def shared_forwards(model, pool, spec, steps, group: int) -> float:
    """Forwards per sample of a rollout of two groups of ``group`` members with a shared
    prefix, counted by the sampler's counter (the latents are not used)."""
    prompts = [p for p in pool[:2] for _ in range(group)]
    counter = ForwardCounter()
    ids = torch.arange(2).repeat_interleave(group)
    gen = torch.Generator().manual_seed(0)
    rollout(model, prompts, ids, spec, steps, gen, counter, share_prefix=group)
    return counter.samples["rollout"] / len(prompts)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help=f"JSON (default {DEFAULT_OUT})")
    p.add_argument("--tasks", default="digits,shapes,text", help="built-in tasks")
    p.add_argument("--samples", type=int, default=8, help="samples per draw (default 8)")
    p.add_argument(
        "--draws",
        type=int,
        help="random draws of SDE steps (default: every choice the trainer can draw, once)",
    )
    p.add_argument("--reference", type=int, default=32, help="R sub-steps (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    results: dict = {}
    for name in ns.tasks.split(","):
        start = time.perf_counter()
        res = measure(name, ns.samples, ns.draws, ns.reference, ns.seed)
        res["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = res
        base = res["rows"][0]
        print(
            f"{name} (shift {res['shift']:g}, {res['num_steps']} steps, SDE steps "
            f"{res['sde_steps_drawn']}): relative RMS error of the final latents to "
            f"{res['reference']} (fine(2R) itself {res['fine_2R_error']:.1e})"
        )
        print(
            f"  {'solver':>6} {'stride':>6} {'forwards':>8} {'error':>9} {'vs today':>8} "
            f"{'shared G=' + str(res['group_size']):>11}"
        )
        for row in res["rows"]:
            print(
                f"  {row['solver']:>6} {row['ode_stride']:>6} {row['forwards_per_sample']:>8.2f} "
                f"{row['error']:>9.2e} {row['error'] / base['error']:>8.2f} "
                f"{row['shared_prefix_forwards_per_sample']:>11.2f}"
            )
        print(f"  {res['seconds']} s", flush=True)
        # After every task: a long text case cut short keeps the others.
        write_record(ns.out, "rollout_forwards", ns.threads, tasks=results)


if __name__ == "__main__":
    main()
