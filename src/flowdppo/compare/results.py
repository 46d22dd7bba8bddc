"""Run results read back from a run directory: the data layer under the report and plots.

Every number comes from the run's own ``summary.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

from flowdppo.compare.runner import RunStatus
from flowdppo.trainer.loop import metrics_of
from flowdppo.units import KL_UNIT

PHASES = ("rollout", "reward", "ref_kl", "update", "eval")


@dataclass
class RunResult:
    status: RunStatus
    values: dict[str, float] = field(default_factory=dict)  # scalar results
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl
    before: dict[str, float] = field(default_factory=dict)  # evaluation at iteration 0
    trust_region: dict = field(default_factory=dict)  # resolved, both forms (summary.json)

    @property
    def ok(self) -> bool:
        return self.status.ok


def mean_of(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def std_of(xs: list[float]) -> float:
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
    result.trust_region = summary.get("trust_region", {})
    objective = status.spec.config.objective_name
    per_step = "dppo_threshold_per_step" if objective == "dppo" else "clip_range_per_step"
    b, a = summary["before"], summary["after"]
    v = result.values
    v["trust_per_step"] = result.trust_region.get(per_step) or math.nan
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
    v["rollout_reward_last10pct"] = mean_of(_series(tail, "reward/mean"))
    # The fraction whose gradient the objective removed is the one that compares across
    # objectives; the window fraction (clip_fraction) is kept beside it for ratio clipping.
    v["grad_blocked"] = mean_of(_series(rows, "grad_blocked_fraction"))
    window = "kl_mask_fraction" if status.spec.config.objective_name == "dppo" else "clip_fraction"
    v["window_fraction"] = mean_of(_series(rows, window))
    v["ratio_std"] = mean_of(_series(rows, "ratio_std"))
    v["kl_old_new"] = mean_of(_series(rows, "kl_mean"))
    for name in reward_names(rows):
        v[f"train_before/{name}"] = b.get(f"eval/train/reward/{name}", math.nan)
        v[f"train_after/{name}"] = a.get(f"eval/train/reward/{name}", math.nan)
        v[f"gain/{name}"] = v[f"train_after/{name}"] - v[f"train_before/{name}"]
    # A task's evaluation groups (the text task's word lengths): after and gain per group.
    for key in sorted(a):
        parts = key.split("/")
        if len(parts) == 5 and parts[0] == "eval" and parts[2] == "group":
            split, group = parts[1], parts[3]
            v[f"{split}_after/group/{group}"] = a[key]
            v[f"{split}_gain/group/{group}"] = a[key] - b.get(key, math.nan)
    for phase in PHASES:
        v[f"time/{phase}"] = summary["time_per_phase_s"].get(phase, 0.0)
    v["wall_s"] = status.wall_s
    # Model forward / backward counts: equal budgets should show equal counts.
    for key, count in summary.get("counts", {}).items():
        v[f"count/{key}"] = float(count)
    return result
