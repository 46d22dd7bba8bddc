"""Reward-KL frontiers: methods compared at matched KL to the reference.

A trust region's tightness is a knob of each method (Flow-DPPO's threshold, ratio
clipping's window), and a looser setting buys reward with KL. One setting of each compares
the two knobs as much as the two methods. Sweeping each knob over the same number of
settings traces each method's frontier, the most reward any of its settings reaches at a
given KL to the reference, and the methods are compared where both frontiers exist.

Every value is read off the runs' evaluations (iteration 0 included, with gain 0 at
KL 0), interpolated linearly in KL; the functions take the report's run results and do
no I/O.
"""

from __future__ import annotations

import math
import statistics

from flowdppo.units import KL_LABEL, KL_UNIT

KL_KEY = "eval/train/kl_ref/mean"
TRAIN_KEY = "eval/train/reward/mean"
HELDOUT_KEY = "eval/heldout/reward/mean"
# Fractions of the highest KL every (algorithm, seed) frontier reaches, where they are read.
LEVELS = (0.125, 0.25, 0.5, 1.0)


def curve(result, key: str) -> list[tuple[float, float]]:
    """``(KL x 1e-3, change of key from the base model)`` at each evaluation of a run."""
    base = result.before.get(key)
    if base is None:
        return []
    pts = [(0.0, 0.0)]
    for r in result.rows:
        if r.get(KL_KEY) is not None and r.get(key) is not None:
            pts.append((r[KL_KEY] / KL_UNIT, r[key] - base))
    return pts


def value_at_kl(result, level: float, key: str = TRAIN_KEY) -> float:
    """Change of ``key`` where the run's KL to the reference first reaches ``level``
    (x 1e-3); NaN if it never does."""
    pts = curve(result, key)
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k1 >= level > k0 or (k1 == level == k0):
            return g0 + (g1 - g0) * (level - k0) / (k1 - k0) if k1 > k0 else g1
    return math.nan


def gain_at_kl(result, level: float) -> float:
    """Evaluation reward gain where the run's KL to the reference first reaches ``level``."""
    return value_at_kl(result, level, TRAIN_KEY)


def frontier_point(results: list, level: float) -> tuple[float, float]:
    """The best gain any of ``results`` (one algorithm's settings, one seed) has at KL
    ``level``, and that run's held-out change there; NaNs if none reaches it."""
    best = (math.nan, math.nan)
    for r in results:
        gain = gain_at_kl(r, level)
        if math.isfinite(gain) and not gain <= best[0]:
            best = (gain, value_at_kl(r, level, HELDOUT_KEY))
    return best


def _stats(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if math.isfinite(x)]
    mean = statistics.fmean(xs) if xs else math.nan
    return mean, statistics.stdev(xs) if len(xs) > 1 else math.nan, len(xs)


def frontier_table(
    results: list, algorithms: list[str], levels: tuple[float, ...] = LEVELS
) -> list[dict]:
    """Rows ``{frontier, level, <algorithm>: (gain mean, sd, n), <algorithm>/heldout: ...,
    difference: ...}`` for every swept frontier of the experiment.

    Per seed, each algorithm's frontier is the best of its settings at each KL level (the
    same number of settings per algorithm keeps that selection even); ``levels`` are
    fractions of the highest KL that every algorithm's frontier reaches in every seed.
    ``difference`` is the first algorithm's gain minus the second's, paired by seed.
    """
    by: dict[str, dict[str, dict[int, list]]] = {}
    for r in results:
        spec = r.status.spec
        if r.ok and spec.frontier:
            by.setdefault(spec.frontier, {}).setdefault(spec.algorithm, {}).setdefault(
                spec.seed, []
            ).append(r)
    rows = []
    for name, per_alg in by.items():
        algs = [a for a in algorithms if a in per_alg]
        reach = [
            max((k for r in runs for k, _ in curve(r, TRAIN_KEY)), default=0.0)
            for a in algs
            for runs in per_alg[a].values()
        ]
        top = min(reach, default=0.0)
        if top <= 0:
            continue
        seeds = sorted(set.intersection(*(set(per_alg[a]) for a in algs)))
        for frac in levels:
            level = top * frac
            row: dict = {"frontier": name, "level": level, "algorithms": algs}
            points = {a: [frontier_point(per_alg[a][s], level) for s in seeds] for a in algs}
            for a in algs:
                row[a] = _stats([p[0] for p in points[a]])
                row[f"{a}/heldout"] = _stats([p[1] for p in points[a]])
            if len(algs) >= 2:
                first, second = points[algs[0]], points[algs[1]]
                row["difference"] = _stats([p[0] - q[0] for p, q in zip(first, second)])
            rows.append(row)
    return rows


def _cell(stat: tuple[float, float, int], fmt: str = "{:+.3f}") -> str:
    mean, sd, _ = stat
    if not math.isfinite(mean):
        return "-"
    return fmt.format(mean) + ("" if not math.isfinite(sd) else f" ± {sd:.3f}")


def frontier_markdown(rows: list[dict]) -> list[str]:
    """The frontier table as markdown lines (empty when the experiment sweeps nothing).

    Frontiers may differ in their algorithms (one frontier per method's own knob): the
    columns are every algorithm of any frontier, "-" where a frontier has none of it.
    """
    if not rows:
        return []
    algs = list(dict.fromkeys(a for row in rows for a in row["algorithms"]))
    paired = any("difference" in row for row in rows)
    pairs = sorted({" − ".join(row["algorithms"][:2]) for row in rows if "difference" in row})
    lines = [
        "## Frontiers at matched KL",
        "",
        "Each algorithm's frontier, per seed, is the best gain any of its swept settings "
        "reaches at the KL level (KL to the reference in 1e-3 per SDE step, interpolated between evaluations); the table gives "
        "the mean ± sd over seeds of that gain and of the same run's held-out change"
        + (f", and the difference {', '.join(pairs)} paired by seed." if paired else "."),
        "",
    ]
    missing = (math.nan, math.nan, 0)
    head = ["frontier", f"KL ({KL_LABEL})", *[f"{a} gain" for a in algs]]
    head += [f"{a} held-out" for a in algs] + (["difference"] if paired else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["frontier"], f"{row['level']:.3g}"]
        cells += [_cell(row.get(a, missing)) for a in algs]
        cells += [_cell(row.get(f"{a}/heldout", missing)) for a in algs]
        if paired:
            cells.append(_cell(row.get("difference", missing)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
