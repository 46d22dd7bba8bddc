"""Turn finished runs into results.md, results.csv, runs.csv and PNG plots.

Every number is read back from the runs' own ``summary.json`` and ``metrics.jsonl``; a
failed run appears in the tables with its error and is left out of the means.
"""

from __future__ import annotations

import csv
import math
import platform
from pathlib import Path

from flowdppo.compare import compute, plots
from flowdppo.compare.experiment import Experiment
from flowdppo.compare.frontier import frontier_markdown, frontier_table, gain_at_kl
from flowdppo.compare.results import (
    PHASES,
    RunResult,
    load_result,
    mean_of,
    reward_names,
    std_of,
)
from flowdppo.compare.runner import RunStatus
from flowdppo.units import KL_LABEL, KL_SENTENCE, kl_inline


def add_matched_kl(results: list[RunResult]) -> float:
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
    ("kl_ref", f"KL to ref ({KL_LABEL})", "{:.3g}"),
    ("efficiency", "gain per 1e-3 KL", "{:.3g}"),
    ("gain_at_matched_kl", "gain at matched KL", "{:+.3f}"),
    ("heldout_after", "held-out after", "{:.3f}"),
    ("heldout_change", "held-out change", "{:+.3f}"),
    ("heldout_kl_ref", f"held-out KL ({KL_LABEL})", "{:.3g}"),
    ("trust_per_step", "δ or ε (nats/step)", "{:.3g}"),
    ("grad_blocked", "grad blocked", "{:.3f}"),
    ("window_fraction", "outside zone", "{:.3f}"),
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
        k: (mean_of([r.values.get(k) for r in ok]), std_of([r.values.get(k) for r in ok]))
        for k in keys
    }


def format_cell(stats: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    if key not in stats or math.isnan(stats[key][0]):
        return "-"
    m, s = (x * scale for x in stats[key])
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
    matched = add_matched_kl(results)
    groups = group_results(exp, results)
    view = compute.compute_view(groups, exp.compute_budget, exp.kl_bound)
    stats = {g: aggregate(rs) for g, rs in groups.items()}
    paths = {"csv": out_dir / "results.csv", "runs_csv": out_dir / "runs.csv"}
    _write_group_csv(paths["csv"], groups, stats)
    _write_runs_csv(paths["runs_csv"], results)
    if view is not None:
        paths["compute_csv"] = out_dir / "compute.csv"
        _write_compute_csv(paths["compute_csv"], view)
    paths.update(plots.write_all(exp, groups, out_dir, view))
    paths["md"] = out_dir / "results.md"
    page = _markdown(exp, groups, stats, results, paths, command, out_dir, matched, view)
    paths["md"].write_text(page)
    return paths


#: The columns the console ends with: what a reader needs first (results.md has them all).
SUMMARY_COLUMNS = ("gain", "kl_ref", "heldout_change", "grad_blocked")
#: The compute columns beside them, when the runs counted their passes.
SUMMARY_COMPUTE = ("forward_equivalents", "gain_at_budget")


def summary_table(exp: Experiment, statuses: list[RunStatus]) -> str:
    """The groups' gain, KL, held-out change, blocked fraction, compute and gain at the
    compute budget as an aligned text table, and the best-at-equal-compute line."""
    results = [load_result(s) for s in statuses]
    groups = group_results(exp, results)
    view = compute.compute_view(groups, exp.compute_budget, exp.kl_bound)
    fmt = {key: (title, f, 1.0) for key, title, f in COLUMNS}
    keys = SUMMARY_COLUMNS + (SUMMARY_COMPUTE if view is not None else ())
    fmt.update({k: compute.COLUMNS[k] for k in SUMMARY_COMPUTE})
    head = ["group", "seeds ok", *[fmt[k][0] for k in keys]]
    rows = [head]
    for g, rs in groups.items():
        stats = aggregate(rs)
        ok = sum(r.ok for r in rs)
        rows.append([g, f"{ok}/{len(rs)}", *[format_cell(stats, k, *fmt[k][1:]) for k in keys]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join([*lines, "", compute.best_line(view)])


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


def _write_compute_csv(path: Path, view: compute.ComputeView) -> None:
    """The compute table: per group, mean and sample std over seeds, the budget and bound."""
    keys = list(compute.COLUMNS)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = [f"{k}{x}" for k in keys for x in ("", "_std")]
        w.writerow(["group", *head, "budget_forward_equivalents", "kl_bound", "best"])
        for g, row in view.rows.items():
            cells = [f"{v:.6g}" for k in keys for v in row[k]]
            w.writerow([g, *cells, f"{view.budget:.6g}", f"{view.kl_bound:.6g}", g == view.best])


def _compute_markdown(view: compute.ComputeView | None) -> list[str]:
    """The reward-against-compute section of results.md."""
    lines = ["## Reward against compute", ""]
    if view is None:
        return [*lines, compute.best_line(view)]
    lines += [
        "Training compute in forward-equivalents: one model forward of one sample in a "
        "training phase (rollout, update, and the update's old-model and reference forwards) "
        "counts 1, its backward 2; evaluations and the logged KL to the reference are left "
        "out (they measure the run). Training wall seconds are the rollout, reward and "
        "update phases, each run on one thread, several runs at a time on a machine that "
        "may be shared: compare them as ratios within one experiment. Gain and KL at the "
        f"budget ({view.budget / compute.FE_UNIT:.3g} x 1e6, {view.budget_source}) are read "
        "along each run's evaluations, interpolated linearly in compute between the two "
        "evaluations around the budget (a run that ended below it counts with its last "
        "evaluation); mean ± sample std over seeds. Plot: `reward_vs_compute.png`; table: "
        "`compute.csv`.",
        "",
    ]
    head = ["group", *[c[0] for c in compute.COLUMNS.values()]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, row in view.rows.items():
        cells = [format_cell(row, k, f, scale) for k, (_, f, scale) in compute.COLUMNS.items()]
        lines.append("| " + " | ".join([f"**{g}**" if g == view.best else g, *cells]) + " |")
    lines += ["", f"**{compute.best_line(view)}**"]
    if view.missing:
        lines += ["", f"No counters in the metrics of: {', '.join(view.missing)} (left out)."]
    return lines


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
        f"{_trust_regions(results)}; evaluation every {cfg.log.eval_every} iterations on "
        f"{cfg.log.eval_samples_per_prompt} fixed-noise samples per prompt"
    )


def _trust_regions(results: list[RunResult]) -> str:
    # GRPO-Guard and DiffusionNFT runs record no per-element / per-step pair.
    tr = next(
        (r.trust_region for r in results if r.ok and (r.trust_region or {}).get("clip_range")),
        None,
    )
    if tr is None:
        return "trust regions: see each run's config.yaml"
    text = (
        f"Flow-DPPO threshold {kl_inline(tr['dppo_threshold'])} (the KL unit of the tables) = "
        f"{tr['dppo_threshold_per_step']:.3g} nats per step, clip range "
        f"{tr['clip_range']:.3g} per element = {tr['clip_range_per_step']:.3g} nats per step "
        f"(d = {tr['latent_elements']})"
    )
    return text


def _markdown(exp, groups, stats, results, paths, command, out_dir, matched, view) -> str:
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
        f"{KL_SENTENCE}; "
        "gain per 1e-3 KL is the KL-proximal efficiency (reward gain over the base model "
        "divided by the final KL to the reference, per seed, then averaged); δ or ε is the "
        "run's trust region in nats per step (Flow-DPPO's KL threshold, ratio clipping's "
        "log-ratio window); grad blocked is the mean over training of the fraction of step "
        "terms whose gradient the objective removed (the same measure for every objective); "
        "outside zone is the fraction outside the trust region, gradient kept or not (KL "
        "above the threshold for Flow-DPPO, ratio outside the clip window for ratio "
        "clipping). Gain at matched KL is each run's evaluation gain where its KL to the "
        f"reference first reaches {matched:.3g}e-3/step, the lowest final KL of any run "
        "(interpolated between evaluations): reward at equal KL.",
        "",
    ]
    head = ["group", "seeds ok", *[c[1] for c in COLUMNS]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rs in groups.items():
        ok = sum(r.ok for r in rs)
        seeds = f"{ok}/{len(rs)}" + ("" if ok == len(rs) else " **FAILED**")
        cells = [format_cell(stats[g], k, f) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join([g, seeds, *cells]) + " |")
    names = reward_names(next((r.rows for r in results if r.ok), []))
    if len(names) > 1:
        lines += ["", "Per reward (trained prompts, before -> after, gain):", ""]
        head = ["group", *[f"{n} after" for n in names], *[f"{n} gain" for n in names]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in groups:
            cells = [format_cell(stats[g], f"train_after/{n}", "{:.3f}") for n in names]
            cells += [format_cell(stats[g], f"gain/{n}", "{:+.3f}") for n in names]
            lines.append("| " + " | ".join([g, *cells]) + " |")
    lines += ["", "Wall time per phase (seconds per run, mean over seeds):", ""]
    head = ["group", *PHASES, "total (process)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [format_cell(stats[g], f"time/{p}", "{:.1f}") for p in PHASES]
        lines.append(
            "| " + " | ".join([g, *cells, format_cell(stats[g], "wall_s", "{:.0f}")]) + " |"
        )
    if any(r.ok for r in results):
        lines += ["", *_compute_markdown(view)]
    frontiers = frontier_table(results, exp.algorithms)
    if frontiers:
        lines += ["", *frontier_markdown(frontiers)]
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
