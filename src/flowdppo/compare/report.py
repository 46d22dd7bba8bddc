"""Turn finished runs into results.md, results.csv, runs.csv and PNG plots.

Every number is read back from the runs' own ``summary.json`` and ``metrics.jsonl``; a
failed run appears in the tables with its error and is left out of the means.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from flowdppo.compare.experiment import Experiment
from flowdppo.compare.runner import RunStatus
from flowdppo.trainer.loop import metrics_of

KL_UNIT = 1e-3  # KL to the reference is reported x 10^-3, as the paper does
PHASES = ("rollout", "reward", "ref_kl", "update", "eval")


@dataclass
class RunResult:
    status: RunStatus
    values: dict[str, float] = field(default_factory=dict)  # scalar results
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl
    before: dict[str, float] = field(default_factory=dict)  # evaluation at iteration 0

    @property
    def ok(self) -> bool:
        return self.status.ok


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def _series(rows: list[dict], key: str) -> list[float | None]:
    return [r.get(key) for r in rows]


def reward_names(rows: list[dict]) -> list[str]:
    names = []
    for key in rows[-1] if rows else {}:
        parts = key.split("/")
        if len(parts) == 4 and parts[:3] == ["eval", "train", "reward"] and parts[3] != "mean":
            names.append(parts[3])
    return names


def load_result(status: RunStatus) -> RunResult:
    result = RunResult(status)
    if not status.ok:
        return result
    run_dir = status.spec.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = metrics_of(run_dir)
    result.rows, result.before = rows, summary["before"]
    b, a = summary["before"], summary["after"]
    v = result.values
    v["train_before"] = b["eval/train/reward/mean"]
    v["train_after"] = a["eval/train/reward/mean"]
    v["gain"] = v["train_after"] - v["train_before"]
    v["kl_ref"] = a["eval/train/kl_ref/mean"] / KL_UNIT
    v["kl_ref_path"] = a["eval/train/kl_ref/path"] / KL_UNIT
    v["efficiency"] = v["gain"] / v["kl_ref"] if v["kl_ref"] > 0 else math.nan
    v["heldout_before"] = b.get("eval/heldout/reward/mean", math.nan)
    v["heldout_after"] = a.get("eval/heldout/reward/mean", math.nan)
    v["heldout_change"] = v["heldout_after"] - v["heldout_before"]
    v["heldout_kl_ref"] = a.get("eval/heldout/kl_ref/mean", math.nan) / KL_UNIT
    tail = rows[-max(1, len(rows) // 10) :]
    v["rollout_reward_last10pct"] = _mean(_series(tail, "reward/mean"))
    key = "masked_fraction" if status.spec.config.objective_name == "dppo" else "clip_fraction"
    v["masked_or_clipped"] = _mean(_series(rows, key))
    v["ratio_std"] = _mean(_series(rows, "ratio_std"))
    v["kl_old_new"] = _mean(_series(rows, "kl_mean"))
    for name in reward_names(rows):
        v[f"train_before/{name}"] = b.get(f"eval/train/reward/{name}", math.nan)
        v[f"train_after/{name}"] = a.get(f"eval/train/reward/{name}", math.nan)
        v[f"gain/{name}"] = v[f"train_after/{name}"] - v[f"train_before/{name}"]
    for phase in PHASES:
        v[f"time/{phase}"] = summary["time_per_phase_s"].get(phase, 0.0)
    v["wall_s"] = status.wall_s
    # Model forward / backward counts: equal budgets should show equal counts.
    for key, count in summary.get("counts", {}).items():
        v[f"count/{key}"] = float(count)
    return result


def gain_at_kl(result: RunResult, level: float) -> float:
    """Evaluation reward gain where the run's KL to the reference first reaches ``level``.

    Linear interpolation along the run's evaluations (iteration 0 included); a fair
    comparison of algorithms that stop at different KLs. NaN if the run never reaches it.
    """
    key_kl, key_r = "eval/train/kl_ref/mean", "eval/train/reward/mean"
    base = result.before[key_r]
    pts = [(0.0, 0.0)]
    pts += [
        (r[key_kl] / KL_UNIT, r[key_r] - base) for r in result.rows if r.get(key_kl) is not None
    ]
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k1 >= level > k0 or (k1 == level == k0):
            return g0 + (g1 - g0) * (level - k0) / (k1 - k0) if k1 > k0 else g1
    return math.nan


def _add_matched_kl(results: list[RunResult]) -> float:
    """Add ``gain_at_matched_kl`` to every run: the gain at the lowest final KL of any run."""
    finals = [r.values["kl_ref"] for r in results if r.ok and r.values["kl_ref"] > 0]
    if not finals:
        return math.nan
    level = min(finals)
    for r in results:
        if r.ok:
            r.values["gain_at_matched_kl"] = gain_at_kl(r, level)
    return level


# Columns of the main table: (key, heading, format).
COLUMNS = [
    ("train_before", "reward before", "{:.3f}"),
    ("train_after", "reward after", "{:.3f}"),
    ("gain", "gain", "{:+.3f}"),
    ("kl_ref", "KL to ref (1e-3)", "{:.3g}"),
    ("efficiency", "gain per 1e-3 KL", "{:.3g}"),
    ("gain_at_matched_kl", "gain at matched KL", "{:+.3f}"),
    ("heldout_after", "held-out after", "{:.3f}"),
    ("heldout_change", "held-out change", "{:+.3f}"),
    ("heldout_kl_ref", "held-out KL (1e-3)", "{:.3g}"),
    ("masked_or_clipped", "masked / clipped", "{:.3f}"),
    ("ratio_std", "ratio std", "{:.2e}"),
    ("wall_s", "wall s", "{:.0f}"),
]


def group_results(exp: Experiment, results: list[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {g: [] for g in exp.groups()}
    for r in results:
        groups[r.status.spec.group].append(r)
    return groups


def aggregate(results: list[RunResult]) -> dict[str, tuple[float, float]]:
    ok = [r for r in results if r.ok]
    keys = list(ok[0].values) if ok else []
    return {
        k: (_mean([r.values.get(k) for r in ok]), _std([r.values.get(k) for r in ok])) for k in keys
    }


def _cell(stats: dict, key: str, fmt: str) -> str:
    if key not in stats or math.isnan(stats[key][0]):
        return "-"
    m, s = stats[key]
    text = fmt.format(m)
    return text if math.isnan(s) else f"{text} ± {fmt.format(s).lstrip('+')}"


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def write_report(
    exp: Experiment, statuses: list[RunStatus], out_dir: Path, command: str
) -> dict[str, Path]:
    """Write the tables and plots; returns their paths by name."""
    out_dir = Path(out_dir)
    results = [load_result(s) for s in statuses]
    matched = _add_matched_kl(results)
    groups = group_results(exp, results)
    stats = {g: aggregate(rs) for g, rs in groups.items()}
    paths = {"csv": out_dir / "results.csv", "runs_csv": out_dir / "runs.csv"}
    _write_group_csv(paths["csv"], groups, stats)
    _write_runs_csv(paths["runs_csv"], results)
    from flowdppo.compare import plots

    paths.update(plots.write_all(exp, groups, out_dir))
    paths["md"] = out_dir / "results.md"
    paths["md"].write_text(_markdown(exp, groups, stats, results, paths, command, out_dir, matched))
    return paths


def _write_group_csv(path: Path, groups: dict, stats: dict) -> None:
    keys: list[str] = []
    for s in stats.values():
        keys += [k for k in s if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["group", "runs", "ok", "failed", *[f"{k}{x}" for k in keys for x in ("", "_std")]]
        )
        for g, rs in groups.items():
            ok = sum(r.ok for r in rs)
            row = [g, len(rs), ok, len(rs) - ok]
            for k in keys:
                m, s = stats[g].get(k, (math.nan, math.nan))
                row += [f"{m:.6g}", f"{s:.6g}"]
            w.writerow(row)


def _write_runs_csv(path: Path, results: list[RunResult]) -> None:
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.values if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "algorithm", "variant", "seed", "status", "error", "run_dir", *keys])
        for r in results:
            s = r.status
            w.writerow(
                [
                    s.spec.group,
                    s.spec.algorithm,
                    s.spec.variant,
                    s.spec.seed,
                    "ok" if s.ok else "failed",
                    s.error or "",
                    str(s.spec.run_dir),
                    *[f"{r.values[k]:.6g}" if k in r.values else "" for k in keys],
                ]
            )


def _budget(exp: Experiment, results: list[RunResult]) -> str:
    cfg = results[0].status.spec.config
    t, s = cfg.train, cfg.sampler
    rewards = ", ".join(cfg.reward.names) or "the task's default"
    return (
        f"task `{cfg.task}`, reward {rewards} (combine `{cfg.reward.combine}`), "
        f"{t.iterations} iterations x {t.prompts_per_iteration} prompts x group {t.group_size}, "
        f"inner epochs {t.inner_epochs}, minibatch {t.minibatch_size}, lr {t.lr:g}, "
        f"{cfg.model.finetune} (rank {cfg.model.lora_rank}), {s.num_steps} steps with "
        f"{s.num_sde_steps} SDE steps in {list(s.sde_window)}, eta {s.eta:g}, "
        f"DPPO threshold {cfg.objective.dppo_threshold:g}, clip range "
        f"{cfg.objective.clip_range:g}; evaluation every {cfg.log.eval_every} iterations on "
        f"{cfg.log.eval_samples_per_prompt} fixed-noise samples per prompt"
    )


def _markdown(exp, groups, stats, results, paths, command, out_dir, matched) -> str:
    mode = "quick" if exp.quick else "full"
    lines = [f"# {exp.name} ({mode} mode)", ""]
    if exp.description:
        lines += [exp.description, ""]
    lines += [
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- seeds: {exp.seeds}; budget (before variant overrides): {_budget(exp, results)}",
        "",
        "Mean ± sample standard deviation over the seeds that finished. Rewards are on "
        "deterministic ODE samples with fixed noise (trained prompts unless marked held-out); "
        "KL to the reference is the exact per-step KL averaged over SDE steps (x 10^-3); "
        "gain per 1e-3 KL is the KL-proximal efficiency (reward gain over the base model "
        "divided by the final KL to the reference, per seed, then averaged); masked / clipped "
        "is the mean over training of the masked fraction (DPPO) or the clip fraction (ratio "
        "clipping). Gain at matched KL is each run's evaluation gain where its KL to the "
        f"reference first reaches {matched:.3g} x 1e-3, the lowest final KL of any run "
        "(interpolated between evaluations): reward at equal KL.",
        "",
    ]
    head = ["group", "seeds ok", *[c[1] for c in COLUMNS]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rs in groups.items():
        ok = sum(r.ok for r in rs)
        seeds = f"{ok}/{len(rs)}" + ("" if ok == len(rs) else " **FAILED**")
        cells = [_cell(stats[g], k, f) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join([g, seeds, *cells]) + " |")
    names = reward_names(next((r.rows for r in results if r.ok), []))
    if len(names) > 1:
        lines += ["", "Per reward (trained prompts, before -> after, gain):", ""]
        head = ["group", *[f"{n} after" for n in names], *[f"{n} gain" for n in names]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in groups:
            cells = [_cell(stats[g], f"train_after/{n}", "{:.3f}") for n in names]
            cells += [_cell(stats[g], f"gain/{n}", "{:+.3f}") for n in names]
            lines.append("| " + " | ".join([g, *cells]) + " |")
    lines += ["", "Wall time per phase (seconds per run, mean over seeds):", ""]
    head = ["group", *PHASES, "total (process)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [_cell(stats[g], f"time/{p}", "{:.1f}") for p in PHASES]
        lines.append("| " + " | ".join([g, *cells, _cell(stats[g], "wall_s", "{:.0f}")]) + " |")
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["", f"## Failed runs ({len(failed)} of {len(results)})", ""]
        lines += ["| group | seed | error | log |", "|---|---|---|---|"]
        for r in failed:
            s = r.status
            log = s.log_path.relative_to(out_dir) if s.log_path else "-"
            err = (s.error or "").replace("|", "\\|")
            lines.append(f"| {s.spec.group} | {s.spec.seed} | {err} | {log} |")
    if "ratio_noise_table" in paths:
        lines += ["", Path(paths["ratio_noise_table"]).read_text()]
    plots = [(k, p) for k, p in paths.items() if str(p).endswith(".png")]
    if plots:
        lines += ["", "## Plots", ""]
        for _, p in plots:
            lines.append(f"![{p.stem}]({p.relative_to(out_dir)})")
    lines += ["", "Per-run numbers: `runs.csv`; per-group means and spreads: `results.csv`."]
    return "\n".join(lines) + "\n"
