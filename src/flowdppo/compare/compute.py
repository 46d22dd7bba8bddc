"""Reward against compute: what each run paid for its gain, and the best at equal compute.

A run's training compute is counted in **forward-equivalents**: model forwards of one
sample in the phases that train (the rollout and the update's forwards, DiffusionNFT's
old-model and reference forwards included) plus each backward counted as two forwards.
Every backward follows one gradient-carrying ``update`` forward over the same samples
(trainer/loop.py), so the backward samples are the update forward samples. Evaluations
and the logged KL to the reference (``eval``, ``ref_kl``) measure the run and are
left out: their cost depends on ``log.*``, not on the method. Training wall seconds are
the run's own rollout, reward and update seconds.

The trainer logs its counters cumulatively in every ``metrics.jsonl`` row, so each
evaluation has the compute spent to reach it; runs are compared at one budget by linear
interpolation between their evaluations (iteration 0 counts: no compute, no gain, no KL).
The functions take the report's run results and do no I/O.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from flowdppo.compare.frontier import KL_KEY, TRAIN_KEY
from flowdppo.compare.results import mean_of, std_of
from flowdppo.units import KL_LABEL, KL_UNIT, kl_inline

#: Phases that measure the run rather than train it.
MEASUREMENT_PHASES = ("eval", "ref_kl")
#: Phases whose seconds are training wall time.
TRAINING_TIME_PHASES = ("rollout", "reward", "update")
FORWARD = "forward_samples/"
BACKWARD_SAMPLES = "forward_samples/update"  # one backward per gradient-carrying forward
FE_UNIT = 1e6  # forward-equivalents are reported x 10^6
#: The per-group columns: (key, heading, format, scale).
COLUMNS = {
    "forward_equivalents": ("training forward-equivalents (1e6)", "{:.4g}", 1 / FE_UNIT),
    "train_wall_s": ("training wall s", "{:.1f}", 1.0),
    "gain": ("final gain", "{:+.3f}", 1.0),
    "gain_at_budget": ("gain at budget", "{:+.3f}", 1.0),
    "kl_at_budget": (f"KL at budget ({KL_LABEL})", "{:.3g}", 1.0),
}


def forward_equivalents(counts: dict) -> float:
    """Training forward-equivalents from a metrics row or a summary's counts (keys
    ``forward_samples/<phase>``); NaN when the counters are missing."""
    phases = {k: v for k, v in counts.items() if k.startswith(FORWARD)}
    if not phases:
        return math.nan
    training = [v for k, v in phases.items() if k[len(FORWARD) :] not in MEASUREMENT_PHASES]
    return float(sum(training) + 2 * phases.get(BACKWARD_SAMPLES, 0))


@dataclass
class Point:
    """One evaluation of a run: the compute spent to reach it and what it measured."""

    iteration: int
    fe: float  # training forward-equivalents
    wall_s: float  # training wall seconds
    gain: float  # evaluation reward (trained prompts) minus the run's own base value
    kl: float  # KL to the reference, x 1e-3


def points(result) -> list[Point]:
    """The run's evaluations with their cumulative compute, iteration 0 first; empty when
    its metrics carry no counters (a run logged before the trainer counted)."""
    base = result.before.get(TRAIN_KEY)
    if base is None or not result.rows:
        return []
    out = [Point(0, 0.0, 0.0, 0.0, 0.0)]
    wall = 0.0
    for row in result.rows:
        wall += sum(row.get(f"time/{p}", 0.0) for p in TRAINING_TIME_PHASES)
        if row.get(TRAIN_KEY) is None:
            continue
        fe = forward_equivalents(row)
        if not math.isfinite(fe):
            return []
        kl = row.get(KL_KEY)
        kl = math.nan if kl is None else kl / KL_UNIT
        out.append(Point(row["iteration"], fe, wall, row[TRAIN_KEY] - base, kl))
    return out if len(out) > 1 else []


def at_budget(pts: list[Point], budget: float) -> tuple[float, float]:
    """(gain, KL) at ``budget`` forward-equivalents, linear between the evaluations
    around it; a run that ended below the budget gives its last evaluation."""
    if not pts:
        return math.nan, math.nan
    if budget >= pts[-1].fe:
        return pts[-1].gain, pts[-1].kl
    for p, q in zip(pts, pts[1:]):
        if p.fe <= budget <= q.fe:
            w = (budget - p.fe) / (q.fe - p.fe) if q.fe > p.fe else 1.0
            return p.gain + w * (q.gain - p.gain), p.kl + w * (q.kl - p.kl)
    return math.nan, math.nan


@dataclass
class ComputeView:
    """The experiment's compute view: the budget and KL bound it used, per-group rows and
    the best group (None when no group is within the bound)."""

    budget: float  # forward-equivalents
    budget_source: str  # "the smallest total of any run" or "compare.compute_budget"
    kl_bound: float  # x 1e-3; NaN: no bound
    kl_source: str
    rows: dict[str, dict[str, tuple[float, float]]]  # group -> key -> (mean, sd)
    best: str | None
    missing: list[str]  # groups whose runs logged no counters


def _stats(xs: list[float]) -> tuple[float, float]:
    return mean_of(xs), std_of(xs)


def compute_view(
    groups: dict[str, list], budget: float | None = None, kl_bound: float | str | None = None
) -> ComputeView | None:
    """Every group's compute and its gain and KL at one budget; None when no run has
    counters. Adds ``forward_equivalents``, ``train_wall_s``, ``gain_at_budget`` and
    ``kl_at_budget`` to each finished run's values (so runs.csv and results.csv carry them).

    ``budget``: forward-equivalents (default: the smallest total of any finished run, which
    every run reaches). ``kl_bound``: KL to the reference x 1e-3 (default: the median over
    groups of the mean KL at the budget; ``"none"``: no bound).
    """
    curves = {g: [(r, points(r)) for r in rs if r.ok] for g, rs in groups.items()}
    missing = [g for g, cs in curves.items() if cs and not any(p for _, p in cs)]
    totals = [p[-1].fe for cs in curves.values() for _, p in cs if p]
    if not totals:
        return None
    source = "compare.compute_budget"
    if budget is None:
        budget, source = min(totals), "the smallest total of any run"
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for g, cs in curves.items():
        cs = [(r, p) for r, p in cs if p]
        if not cs:
            continue
        for r, p in cs:
            gain, kl = at_budget(p, budget)
            r.values.update(
                forward_equivalents=p[-1].fe,
                train_wall_s=p[-1].wall_s,
                gain_at_budget=gain,
                kl_at_budget=kl,
            )
        rows[g] = {k: _stats([r.values[k] for r, _ in cs]) for k in COLUMNS}
    kls = [row["kl_at_budget"][0] for row in rows.values() if math.isfinite(row["kl_at_budget"][0])]
    if kl_bound == "none":
        bound, kl_source = math.nan, "compare.kl_bound: none"
    elif kl_bound is not None:
        bound, kl_source = float(kl_bound), "compare.kl_bound"
    elif kls:
        bound, kl_source = statistics.median(kls), "the median over groups of KL at the budget"
    else:
        bound, kl_source = math.nan, "none (no run logged its KL to the reference)"
    eligible = {
        g: row["gain_at_budget"][0]
        for g, row in rows.items()
        if math.isfinite(row["gain_at_budget"][0])
        and (math.isnan(bound) or row["kl_at_budget"][0] <= bound)
    }
    best = max(eligible, key=eligible.get) if eligible else None
    return ComputeView(budget, source, bound, kl_source, rows, best, missing)


def best_line(view: ComputeView | None) -> str:
    """One line naming the best group at equal compute, or why there is none."""
    if view is None:
        return (
            "Best at equal compute: not available, the runs' metrics.jsonl rows hold no "
            "forward_samples/* counters (reward against compute needs them)."
        )
    bound = (
        f"KL to the reference at most {kl_inline(view.kl_bound * KL_UNIT)} ({view.kl_source})"
        if math.isfinite(view.kl_bound)
        else f"no KL bound ({view.kl_source})"
    )
    where = (
        f"at {view.budget / FE_UNIT:.3g} x 1e6 training forward-equivalents ({view.budget_source}) "
        f"with {bound}"
    )
    if view.best is None:
        return f"Best at equal compute {where}: no group stays within the bound."
    row = view.rows[view.best]
    return (
        f"Best at equal compute {where}: {view.best}, gain {row['gain_at_budget'][0]:+.3f} at "
        f"KL {kl_inline(row['kl_at_budget'][0] * KL_UNIT)}."
    )
