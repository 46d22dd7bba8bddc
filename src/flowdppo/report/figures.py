"""The report's plots, drawn with compare's helpers (compare/plots.py) and returned as
PNG data URIs, so the page needs no file beside it."""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from flowdppo.compare import plots
from flowdppo.compare.results import RunResult
from flowdppo.units import KL_LABEL, KL_UNIT

EVAL_TRAIN, EVAL_HELD = plots.EVAL_TRAIN, plots.EVAL_HELD
EVAL_KL = "eval/train/kl_ref/mean"


def data_uri(fig, left: float = 0.9) -> str:
    """The figure as a PNG data URI; ``left``: the left margin in inches."""
    buf = io.BytesIO()
    # Fixed margins in inches (an automatic layout would draw every figure twice), and
    # 1.1 inches between neighbours for the y labels of the next axes.
    w, h = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    gap_w, gap_h = 1.1, 0.7
    axes_w = (w - left - 0.15 - (cols - 1) * gap_w) / cols
    axes_h = (h - 0.8 - (rows - 1) * gap_h) / rows
    fig.subplots_adjust(
        left=left / w,
        right=1 - 0.15 / w,
        bottom=0.5 / h,
        top=1 - 0.3 / h,
        wspace=gap_w / axes_w,
        hspace=gap_h / axes_h,
    )
    fig.savefig(buf, format="png", dpi=90)
    plots.pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def styles_of(groups: list[str]) -> dict[str, plots.Style]:
    return dict(zip(groups, (plots.Style(c) for c in plots.colors(len(groups)))))


def wall_seconds(rows: list[dict]) -> dict[int, float]:
    """Seconds of training at the end of each logged iteration (evaluations included)."""
    out, total = {}, 0.0
    for r in rows:
        total += (r.get("time/iteration") or 0.0) + (r.get("time/eval") or 0.0)
        out[r["iteration"]] = total
    return out


def _wall_unit(ok: dict[str, list[RunResult]]) -> tuple[float, str]:
    longest = max(max(wall_seconds(r.rows).values(), default=0.0) for rs in ok.values() for r in rs)
    return (60.0, "minutes") if longest > 120 else (1.0, "seconds")


def _window(ok: dict[str, list[RunResult]]) -> int:
    return max(1, max(len(r.rows) for rs in ok.values() for r in rs) // 20)


def _by_wall(ax, rs, key: str, style, label: str, unit, scale=1.0, ls=None, window=1):
    """One line per run (seeds run for different times) against its wall time; ``window``:
    a moving mean, as against iteration."""
    for i, r in enumerate(rs):
        wall = wall_seconds(r.rows)
        pts = [
            (wall[row["iteration"]] / unit, row[key] * scale)
            for row in r.rows
            if row.get(key) is not None
        ]
        if key.startswith("eval/") and key in r.before:
            pts.insert(0, (0.0, r.before[key] * scale))
        if pts:
            x, y = zip(*pts)
            y = plots.smooth(np.array(y), window)
            ax.plot(
                x, y, color=style.color, ls=ls or style.ls, lw=1.2, label=label if i == 0 else None
            )


def _legend(axes) -> None:
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")


def reward(ok, styles) -> str:
    plt, w = plots.pyplot(), _window(ok)
    unit, name = _wall_unit(ok)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for g, rs in ok.items():
        st = styles[g]
        plots.band(axes[0, 0], *plots.curve(rs, "reward/mean"), g, st, w)
        plots.band(axes[0, 1], *plots.curve(rs, EVAL_TRAIN, with_before=True), f"{g} trained", st)
        held = plots.curve(rs, EVAL_HELD, with_before=True)
        plots.band(axes[0, 1], *held, f"{g} held-out", plots.Style(st.color, ":"))
        _by_wall(axes[1, 0], rs, "reward/mean", st, g, unit, window=w)
        _by_wall(axes[1, 1], rs, EVAL_TRAIN, st, f"{g} trained", unit)
        _by_wall(axes[1, 1], rs, EVAL_HELD, st, f"{g} held-out", unit, ls=":")
    axes[0, 0].set(xlabel="iteration", ylabel=f"rollout reward (moving mean of {w})")
    axes[0, 1].set(xlabel="iteration", ylabel="evaluation reward (ODE, fixed noise)")
    axes[1, 0].set(xlabel=f"wall time ({name})", ylabel=f"rollout reward (moving mean of {w})")
    axes[1, 1].set(xlabel=f"wall time ({name})", ylabel="evaluation reward")
    _legend(axes.flat)
    return data_uri(fig)


def kl(ok, styles) -> str:
    plt, w = plots.pyplot(), _window(ok)
    unit, name = _wall_unit(ok)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    scale = 1 / KL_UNIT
    for g, rs in ok.items():
        st = styles[g]
        plots.band(axes[0], *plots.curve(rs, "kl_ref/mean", scale), f"{g} rollout", st, w)
        ev = plots.curve(rs, EVAL_KL, scale, with_before=True)
        plots.band(axes[0], *ev, f"{g} evaluation", plots.Style(st.color, "--"))
        _by_wall(axes[1], rs, EVAL_KL, st, f"{g} evaluation", unit, scale, ls="--")
    axes[0].set(xlabel="iteration", ylabel=f"KL to reference ({KL_LABEL})")
    axes[1].set(xlabel=f"wall time ({name})", ylabel=f"KL to reference ({KL_LABEL})")
    _legend(axes)
    return data_uri(fig)


def trust_region(ok, styles) -> str:
    """The fraction of step terms whose gradient the objective removed, and the fraction
    outside the trust region's zone (Flow-DPPO's KL mask, ratio clipping's window)."""
    plt, w = plots.pyplot(), _window(ok)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for g, rs in ok.items():
        plots.band(axes[0], *plots.curve(rs, "grad_blocked_fraction"), g, styles[g], w)
        for key, ls in (("kl_mask_fraction", "-"), ("clip_fraction", "--")):
            if any(row.get(key) is not None for r in rs for row in r.rows):
                c = plots.curve(rs, key)
                plots.band(axes[1], *c, f"{g} {key}", plots.Style(styles[g].color, ls), w)
    axes[0].set(xlabel="iteration", ylabel="grad-blocked fraction of step terms")
    axes[1].set(xlabel="iteration", ylabel="fraction outside the zone (mask / clip)")
    _legend(axes)
    return data_uri(fig)


def ratio(ok, styles) -> str:
    plt, w = plots.pyplot(), _window(ok)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for g, rs in ok.items():
        st = styles[g]
        plots.band(axes[0], *plots.curve(rs, "ratio_std"), g, st, w, positive=True)
        plots.band(axes[1], *plots.curve(rs, "ratio_max"), f"{g} max", st, w)
        plots.band(
            axes[1], *plots.curve(rs, "ratio_min"), f"{g} min", plots.Style(st.color, "--"), w
        )
        plots.band(axes[2], *plots.curve(rs, "kl_mean"), g, st, w, positive=True)
    axes[0].set(xlabel="iteration", ylabel="std of the ratio in the update", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="ratio range in the update")
    axes[2].set(xlabel="iteration", ylabel="KL(old || new) per step, mean", yscale="log")
    _legend(axes)
    return data_uri(fig)


def frontier(ok, styles) -> str:
    fig, ax = plots.pyplot().subplots(1, 1, figsize=(6.5, 4.5))
    plots.draw_frontier(ax, ok, styles)
    ax.set_title("reward-KL frontier over training (each dot an evaluation)", fontsize=9)
    _legend([ax])
    return data_uri(fig)


def phase_times(ok) -> str:
    fig, ax = plots.pyplot().subplots(1, 1, figsize=(8, 0.45 * len(ok) + 1.6))
    plots.draw_phase_times(ax, ok)
    # Above the bars, in one row: inside it would cover the last phase.
    ax.legend(fontsize=7, ncol=5, loc="lower left", bbox_to_anchor=(0, 1), frameon=False)
    return data_uri(fig, left=0.3 + 0.075 * max(len(g) for g in ok))


def inference_rewards(rows: list[dict]) -> list[tuple[str, str]]:
    """The reward columns of inference-cost rows, (key, name): trained and held-out prompts
    apart (held-out where the run has them); a file written before the split has only the
    mean over both."""
    if not any("reward_trained" in r for r in rows):
        return [("reward_mean", "evaluation prompts")]
    keys = [("reward_trained", "trained prompts")]
    if any(r.get("reward_heldout") is not None for r in rows):
        keys.append(("reward_heldout", "held-out prompts"))
    return keys


def compute(ok, styles, view) -> str:
    fig, axes = plots.pyplot().subplots(1, 2, figsize=(11, 4))
    plots.draw_compute(axes, ok, styles, view)
    _legend(axes)
    return data_uri(fig)


def inference(runs: dict[str, list[dict]], styles) -> str:
    """Evaluation reward against function evaluations per sample, base and trained: one
    panel for the trained prompts, one for the held-out ones."""
    panels = inference_rewards([r for rows in runs.values() for r in rows])
    fig, axes = plots.pyplot().subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2))
    axes = np.atleast_1d(axes)
    for ax, (key, name) in zip(axes, panels):
        for g, rows in runs.items():
            lines: dict[tuple, list[tuple[float, float]]] = {}
            for r in rows:
                if r.get(key) is None or not math.isfinite(r[key]):
                    continue
                lines.setdefault((r.get("model"), r.get("lora")), []).append((r["nfe"], r[key]))
            for (model, lora), pts in lines.items():
                x, y = np.array(sorted(pts)).T
                label = f"{g} {model}" + (f" (LoRA {lora})" if lora else "")
                ls = "--" if model == "base" else "-"
                ax.plot(x, y, marker="o", ms=4, color=styles[g].color, ls=ls, label=label)
        ax.set(xlabel="function evaluations per sample (NFE)", ylabel=f"reward, {name}")
        ax.set_xscale("log")
    _legend(axes)
    return data_uri(fig)
