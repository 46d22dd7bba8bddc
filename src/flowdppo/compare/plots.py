"""PNG plots of a comparison (matplotlib, Agg backend): one figure per question."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowdppo.compare.compute import FE_UNIT, ComputeView, points
from flowdppo.compare.frontier import frontier_table
from flowdppo.compare.results import PHASES, RunResult, reward_names
from flowdppo.units import KL_LABEL, KL_UNIT

EVAL_TRAIN = "eval/train/reward/mean"
EVAL_HELD = "eval/heldout/reward/mean"


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise RuntimeError(
            "flowdppo compare draws its plots with matplotlib: pip install matplotlib"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(
    runs: list[RunResult],
    key: str,
    scale: float = 1.0,
    with_before: bool = False,
    relative: bool = False,
):
    """(iterations, mean, std) over the seeds at the iterations every run logged ``key``.

    ``relative``: each run's value minus its own value before training (the evaluation
    noise differs between seeds, so the change is what compares like with like).
    """
    per_run = []
    for r in runs:
        base = r.before.get(key, 0.0) if relative else 0.0
        pts = {row["iteration"]: row[key] - base for row in r.rows if row.get(key) is not None}
        if with_before and key in r.before:
            pts[0] = r.before[key] - base
        per_run.append(pts)
    if not per_run:
        return np.array([]), np.array([]), np.array([])
    its = sorted(set.intersection(*(set(p) for p in per_run)))
    vals = np.array([[p[i] * scale for i in its] for p in per_run], dtype=float)
    return np.array(its), vals.mean(0), vals.std(0, ddof=1) if len(per_run) > 1 else 0 * vals[0]


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    pad = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


@dataclass
class Style:
    color: tuple
    ls: str = "-"


def _styles(exp, groups: list[str]) -> dict[str, Style]:
    """One colour per group; or, when every variant runs every algorithm (and there are at
    most four variants), one colour per algorithm and one line style per variant."""
    algorithms = list(dict.fromkeys(g.split(" [")[0] for g in groups))
    variants = [v.label for v in exp.variants]
    crossed = 1 < len(variants) <= 4 and all(v.algorithms is None for v in exp.variants)
    if not crossed:
        return dict(zip(groups, (Style(c) for c in colors(len(groups)))))
    palette = dict(zip(algorithms, colors(len(algorithms))))
    lines = dict(zip(variants, ["-", "--", ":", "-."]))
    out = {}
    for g in groups:
        alg, _, variant = g.partition(" [")
        out[g] = Style(palette[alg], lines.get(variant.removesuffix("]"), "-"))
    return out


def band(ax, x, m, s, label, style, window=1, positive=False):
    if len(x) == 0:
        return
    m, s = smooth(m, window), smooth(np.asarray(s, dtype=float), window)
    ax.plot(x, m, label=label, color=style.color, ls=style.ls, lw=1.5)
    low = np.maximum(m - s, m / 10) if positive else m - s  # a log axis has no zero
    ax.fill_between(x, low, m + s, color=style.color, alpha=0.12, lw=0)


def colors(n: int):
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _ok(groups: dict[str, list[RunResult]]) -> dict[str, list[RunResult]]:
    return {g: [r for r in rs if r.ok] for g, rs in groups.items() if any(r.ok for r in rs)}


def _finish(fig, axes, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def points_line(ax, x, y, label: str, style: Style, xerr=None, yerr=None) -> None:
    """One group's evaluations joined by a line, each with its spread over seeds."""
    ax.errorbar(
        x,
        y,
        xerr=xerr,
        yerr=yerr,
        label=label,
        color=style.color,
        ls=style.ls,
        marker="o",
        ms=3,
        lw=1.2,
        elinewidth=0.6,
        capsize=0,
        alpha=0.9,
    )


def draw_frontier(ax, ok: dict[str, list[RunResult]], styles: dict[str, Style]) -> None:
    """Each group's evaluation reward gain against its KL to the reference, over training
    (mean ± std over seeds at each evaluation)."""
    for g, rs in ok.items():
        _, kl, kls = curve(rs, "eval/train/kl_ref/mean", 1 / KL_UNIT, with_before=True)
        _, rw, rws = curve(rs, EVAL_TRAIN, with_before=True, relative=True)
        points_line(ax, kl, rw, g, styles[g], xerr=kls, yerr=rws)
    ax.set(xlabel=f"KL to reference ({KL_LABEL})", ylabel="evaluation reward gain over base")


def draw_phase_times(ax, ok: dict[str, list[RunResult]]) -> None:
    """Stacked wall time per phase, one bar per group (mean over seeds)."""
    left = np.zeros(len(ok))
    for phase, color in zip(PHASES, colors(len(PHASES))):
        vals = np.array([np.mean([r.values[f"time/{phase}"] for r in rs]) for rs in ok.values()])
        ax.barh(list(ok), vals, left=left, label=phase, color=color)
        left += vals
    ax.invert_yaxis()
    ax.set(xlabel="seconds per run (mean over seeds)")


def draw_compute(axes, ok: dict[str, list[RunResult]], styles, view: ComputeView) -> None:
    """Evaluation reward gain against training forward-equivalents (left) and training wall
    seconds (right): mean ± std over seeds at each evaluation, the budget marked."""
    for g, rs in ok.items():
        runs = [{p.iteration: p for p in points(r)} for r in rs]
        runs = [p for p in runs if p]
        if not runs:
            continue
        its = sorted(set.intersection(*(set(p) for p in runs)))
        for ax, attr, scale in ((axes[0], "fe", 1 / FE_UNIT), (axes[1], "wall_s", 1.0)):
            x = np.array([[getattr(p[i], attr) * scale for i in its] for p in runs])
            y = np.array([[p[i].gain for i in its] for p in runs])
            err = y.std(0, ddof=1) if len(runs) > 1 else None
            points_line(ax, x.mean(0), y.mean(0), g, styles[g], yerr=err)
    axes[0].axvline(view.budget / FE_UNIT, color="k", ls=":", lw=1, label="budget")
    axes[0].set(
        xlabel="training forward-equivalents (x 1e6; a backward = 2 forwards)",
        ylabel="evaluation reward gain over base",
    )
    axes[1].set(xlabel="training wall seconds (rollout, reward, update)")


def write_all(
    exp, groups: dict[str, list[RunResult]], out_dir: Path, view: ComputeView | None = None
) -> dict[str, Path]:
    plt = pyplot()
    ok = _ok(groups)
    out: dict[str, Path] = {}
    if not ok:
        return out
    styles = _styles(exp, list(ok))
    iters = max(len(r.rows) for rs in ok.values() for r in rs)
    window = max(1, iters // 20)
    seeds = f"mean ± std over seeds {exp.seeds}"

    # Reward against iteration: the training rollouts and the fixed-noise evaluation.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g, rs in ok.items():
        band(axes[0], *curve(rs, "reward/mean"), g, styles[g], window)
        band(axes[1], *curve(rs, EVAL_TRAIN, with_before=True, relative=True), g, styles[g])
    axes[0].set(xlabel="iteration", ylabel=f"rollout reward (moving mean of {window})")
    axes[1].set(xlabel="iteration", ylabel="evaluation reward gain over base, trained prompts")
    out["reward"] = _finish(fig, axes, out_dir / "reward_vs_iteration.png", seeds)

    # The reward-KL frontier.
    fig, axes = plt.subplots(1, 1, figsize=(6, 4.5))
    axes = [axes]
    draw_frontier(axes[0], ok, styles)
    out["frontier"] = _finish(
        fig, axes, out_dir / "reward_vs_kl.png", f"reward-KL frontier over training; {seeds}"
    )

    # Forgetting: held-out prompts.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g, rs in ok.items():
        band(axes[0], *curve(rs, EVAL_HELD, with_before=True, relative=True), g, styles[g])
        band(
            axes[1],
            *curve(rs, "eval/heldout/kl_ref/mean", 1 / KL_UNIT, with_before=True),
            g,
            styles[g],
        )
    axes[0].set(xlabel="iteration", ylabel="held-out reward change from base")
    axes[1].set(xlabel="iteration", ylabel=f"KL to reference, held-out ({KL_LABEL})")
    out["heldout"] = _finish(fig, axes, out_dir / "heldout_vs_iteration.png", seeds)

    # The fraction of step terms whose gradient the objective removed (every objective).
    fig, axes = plt.subplots(1, 1, figsize=(6, 4))
    axes = [axes]
    for g, rs in ok.items():
        band(axes[0], *curve(rs, "grad_blocked_fraction"), g, styles[g], window)
    axes[0].set(xlabel="iteration", ylabel="fraction of step terms with gradient removed")
    out["mask"] = _finish(fig, axes, out_dir / "grad_blocked_fraction.png", seeds)

    # Ratio statistics and the exact KL between the old and new policy.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g, rs in ok.items():
        band(axes[0], *curve(rs, "ratio_std"), g, styles[g], window, positive=True)
        band(axes[1], *curve(rs, "kl_mean"), g, styles[g], window, positive=True)
    axes[0].set(xlabel="iteration", ylabel="std of the ratio in the update", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="KL(old || new) per step, mean", yscale="log")
    out["ratio"] = _finish(fig, axes, out_dir / "ratio_stats.png", seeds)

    # Wall time per phase.
    fig, axes = plt.subplots(1, 1, figsize=(7, 0.45 * len(ok) + 1.5))
    axes = [axes]
    draw_phase_times(axes[0], ok)
    out["time"] = _finish(fig, axes, out_dir / "time_per_phase.png", "wall time per phase")

    if view is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        draw_compute(axes, ok, styles, view)
        out["compute"] = _finish(fig, axes, out_dir / "reward_vs_compute.png", seeds)

    names = reward_names(next(iter(ok.values()))[0].rows)
    if len(names) > 1:
        fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4))
        for ax, name in zip(axes, names):
            for g, rs in ok.items():
                c = curve(rs, f"eval/train/reward/{name}", with_before=True, relative=True)
                band(ax, *c, g, styles[g])
            ax.set(xlabel="iteration", ylabel=f"evaluation {name}, gain over base")
        out["components"] = _finish(fig, list(axes), out_dir / "reward_components.png", seeds)

    if any(r.status.spec.frontier for rs in ok.values() for r in rs):
        out["frontiers"] = _frontiers(exp, ok, out_dir, seeds)
    if exp.probe == "ratio_noise":
        out.update(_ratio_noise(ok, styles, out_dir))
    return out


def _frontiers(exp, ok, out_dir: Path, seeds: str) -> Path:
    """Each swept frontier: every algorithm's best gain over its settings at each KL (mean
    ± sd over seeds), with each setting's final point."""
    plt = pyplot()
    results = [r for rs in ok.values() for r in rs]
    rows = frontier_table(results, exp.algorithms, tuple(np.linspace(0.05, 1.0, 20)))
    names = list(dict.fromkeys(r["frontier"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5.5 * max(1, len(names)), 4.2))
    axes = list(np.atleast_1d(axes))
    palette = colors(len(exp.algorithms))
    for ax, name in zip(axes, names):
        mine = [r for r in rows if r["frontier"] == name]
        for color, alg in zip(palette, exp.algorithms):
            if alg not in mine[0]:
                continue
            kl = np.array([r["level"] for r in mine])
            mean = np.array([r[alg][0] for r in mine])
            sd = np.nan_to_num(np.array([r[alg][1] for r in mine]))
            ax.plot(kl, mean, color=color, label=f"{alg} frontier")
            ax.fill_between(kl, mean - sd, mean + sd, color=color, alpha=0.15)
            for rs in ok.values():
                spec = rs[0].status.spec
                if spec.frontier == name and spec.algorithm == alg:
                    x = np.mean([r.values["kl_ref"] for r in rs])
                    y = np.mean([r.values["gain"] for r in rs])
                    ax.scatter([x], [y], color=color, s=14)
                    ax.annotate(spec.variant.removeprefix(name).strip(), (x, y), fontsize=6)
        # Log KL: the loosest settings end orders of magnitude beyond the common range.
        ax.set(
            xlabel=f"KL to reference ({KL_LABEL}, log)",
            ylabel="evaluation reward gain over base",
            title=f"frontier {name}",
            xscale="log",
        )
    return _finish(fig, axes, out_dir / "frontiers.png", f"{seeds}; dots: final points")


def _ratio_noise(ok, styles, out_dir: Path) -> dict[str, Path]:
    from flowdppo.compare.ratio_noise import read_probe

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = [
        "## Ratio noise against the exact KL (docs/method.md)",
        "",
        "Pooled over iterations, SDE steps, samples and seeds. D is the exact summed KL "
        "between the updated and the rollout policy at each recorded state; for a fresh draw "
        "x' ~ pi_old theory says log r ~ N(-D, 2D), so z = (log r + D) / sqrt(2D) has mean 0 "
        "and variance 1. 'trained' re-scores the rollout's own x' (the sample the update was "
        "fitted to).",
        "",
        "| group | pairs | mean D | mean log r (fresh) | var log r / 2D (fresh) | z mean | "
        "z var | P(r < 1) fresh | mean log r (trained) | P(r < 1) trained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    grid = np.linspace(-4, 4, 200)
    for g, rs in ok.items():
        d, lf, lt = [], [], []
        for r in rs:
            for rec in read_probe(r.status.spec.run_dir):
                d += rec["kl"]
                lf += rec["log_ratio_fresh"]
                lt += rec["log_ratio_trained"]
        if not d:
            continue
        d, lf, lt = np.array(d), np.array(lf), np.array(lt)
        pos = d > 0
        z = (lf[pos] + d[pos]) / np.sqrt(2 * d[pos])
        rows.append(
            f"| {g} | {len(d)} | {d.mean():.3g} | {lf.mean():.3g} | "
            f"{lf.var() / (2 * d.mean()):.3g} | {z.mean():.3f} | {z.var():.3f} | "
            f"{(lf < 0).mean():.3f} | {lt.mean():.3g} | {(lt < 0).mean():.3f} |"
        )
        # Binned by D: the measured mean and variance of the log-ratio.
        lo, hi = np.quantile(d[pos], [0.01, 0.99])
        if hi > lo > 0:
            edges = np.geomspace(lo, hi, 12)
            idx = np.digitize(d, edges)
            cx, mean_lr, var_lr = [], [], []
            for b in range(1, len(edges)):
                sel = idx == b
                if sel.sum() >= 10:
                    cx.append(d[sel].mean())
                    mean_lr.append(-lf[sel].mean())
                    var_lr.append(lf[sel].var())
            axes[0].loglog(cx, mean_lr, "o", color=styles[g].color, ms=4, label=g)
            axes[1].loglog(cx, var_lr, "o", color=styles[g].color, ms=4, label=g)
        axes[2].hist(
            z, bins=60, range=(-4, 4), density=True, histtype="step", color=styles[g].color, label=g
        )
    for ax, ylabel, factor in (
        (axes[0], "-mean log r (fresh)", 1),
        (axes[1], "var log r (fresh)", 2),
    ):
        xs = np.array(ax.get_xlim())
        ax.plot(xs, factor * xs, "k--", lw=1, label=f"theory: {'' if factor == 1 else '2'}D")
        ax.set(xlabel="exact KL D (summed over elements)", ylabel=ylabel)
    axes[2].plot(grid, np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi), "k--", lw=1, label="N(0,1)")
    axes[2].set(xlabel="z = (log r + D) / sqrt(2D), fresh draws", ylabel="density")
    for ax in axes[1:]:
        ax.legend(fontsize=7)
    path = _finish(fig, axes, out_dir / "ratio_noise.png", "ratio noise against the exact KL")
    table = out_dir / "ratio_noise.md"
    table.write_text("\n".join(rows) + "\n")
    return {"ratio_noise": path, "ratio_noise_table": table}
