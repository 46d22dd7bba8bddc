"""The runs a report shows, read back from run directories or one compare folder.

Each run becomes the ``RunResult`` that ``flowdppo compare`` builds (compare/results.py),
grouped under a label: a run directory given on the command line is its own group; the
runs of a compare folder keep their groups (``runs.csv``), their seeds aggregated.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from flowdppo.compare.experiment import RunSpec
from flowdppo.compare.results import RunResult, load_result
from flowdppo.compare.runner import RunStatus
from flowdppo.config import ConfigError, config_from_dict, read_yaml
from flowdppo.trainer.runlog import METRICS

INFERENCE_COST = "inference_cost.json"  # written by ``flowdppo eval RUN --steps ...``
_GRID = re.compile(r"iter-(\d+)(?:-p(\d+))?\.(png|gif|mp4)$")


@dataclass
class Evaluation:
    """The grid files of one evaluation: PNG pages, and for videos MP4 (or GIF) pages."""

    iteration: int
    pages: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)


@dataclass
class ReportRun:
    label: str  # the group it is aggregated under
    result: RunResult
    config_text: str
    evaluations: list[Evaluation]
    inference: list[dict]  # rows of inference_cost.json; empty without it
    logged: int  # iterations in metrics.jsonl (an unfinished run has no summary.json)


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def is_compare_dir(path: Path) -> bool:
    return (path / "runs.csv").is_file() and (path / "runs").is_dir()


def evaluations_of(run_dir: Path) -> list[Evaluation]:
    """Every evaluation's grid pages in ``run_dir/grids``, in order of iteration and page."""
    found: dict[int, dict[str, list[tuple[int, Path]]]] = {}
    for f in sorted((run_dir / "grids").glob("iter-*")):
        m = _GRID.match(f.name)
        if m:
            kinds = found.setdefault(int(m.group(1)), {})
            kinds.setdefault(m.group(3), []).append((int(m.group(2) or 1), f))
    out = []
    for it in sorted(found):
        kinds = {k: [p for _, p in sorted(v)] for k, v in found[it].items()}
        out.append(Evaluation(it, kinds.get("png", []), kinds.get("mp4") or kinds.get("gif", [])))
    return out


def read_inference_cost(run_dir: Path) -> list[dict]:
    """The rows of ``inference_cost.json``; none without the file; one error line naming
    the file and the row for a file of another shape."""
    path = run_dir / INFERENCE_COST
    if not path.is_file():
        return []
    fix = f"rewrite it with flowdppo eval {run_dir} --steps ..., or move it away"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not an inference-cost table ({exc}); {fix}") from exc
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: 'rows' must be a list of rows; {fix}")
    for i, row in enumerate(rows):
        number = (int, float, type(None))
        ok = (
            isinstance(row, dict)
            and isinstance(row.get("model"), str)
            and isinstance(row.get("nfe"), int)
            and isinstance(row.get("reward_mean"), number)
            and isinstance(row.get("ms_per_image"), number)
        )
        if not ok:
            raise ConfigError(
                f"{path}: row {i} needs model (text), nfe (an integer), reward_mean and "
                f"ms_per_image (numbers or null), got {row!r}; {fix}"
            )
    return rows


def load_run(run_dir: Path, label: str, status: RunStatus | None = None) -> ReportRun:
    config_path = run_dir / "config.yaml"
    cfg = config_from_dict(read_yaml(config_path), str(config_path))
    if status is None:
        spec = RunSpec(label, "", cfg.algorithm, cfg.train.seed, cfg, run_dir)
        finished = (run_dir / "summary.json").is_file()
        status = RunStatus(spec, finished, None if finished else "unfinished", 0.0, None)
    result = load_result(status)
    if result.ok and not status.wall_s:
        # The run's own seconds (every phase, evaluations included).
        status.wall_s = sum(
            json.loads((run_dir / "summary.json").read_text())["time_per_phase_s"].values()
        )
        result.values["wall_s"] = status.wall_s
    metrics = run_dir / METRICS
    logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    return ReportRun(
        label,
        result,
        config_path.read_text(),
        evaluations_of(run_dir),
        read_inference_cost(run_dir),
        logged,
    )


def _compare_runs(out_dir: Path) -> list[ReportRun]:
    runs = []
    with open(out_dir / "runs.csv") as f:
        for row in csv.DictReader(f):
            run_dir = Path(row["run_dir"])  # as compare named it, from its own folder
            if not is_run_dir(run_dir):
                run_dir = out_dir / "runs" / run_dir.name
            if not is_run_dir(run_dir):
                continue  # a run that failed before writing its config
            cfg = config_from_dict(read_yaml(run_dir / "config.yaml"), str(run_dir))
            spec = RunSpec(
                row["group"],
                row["variant"],
                row["algorithm"],
                int(row["seed"]),
                cfg,
                run_dir,
            )
            ok = row["status"] == "ok" and (run_dir / "summary.json").is_file()
            wall = float(row["wall_s"]) if row.get("wall_s") else 0.0
            status = RunStatus(spec, ok, row.get("error") or None, wall, None)
            runs.append(load_run(run_dir, row["group"], status))
    return runs


def collect(paths: list[str | Path]) -> list[ReportRun]:
    """The runs of run directories, or of one compare folder; one error line otherwise."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("flowdppo report takes one or more run directories or a compare folder")
    for p in paths:
        if not p.is_dir():
            raise ConfigError(f"{p} is not a directory (give run directories or a compare folder)")
        if not (is_run_dir(p) or is_compare_dir(p)):
            raise ConfigError(
                f"{p} is neither a run directory (no config.yaml) nor a compare folder (no "
                "runs.csv and runs/)"
            )
    compares = [p for p in paths if is_compare_dir(p)]
    if compares and len(paths) > 1:
        raise ConfigError(
            f"{compares[0]} is a compare folder: report it alone, or give run directories only"
        )
    if compares:
        runs = _compare_runs(compares[0])
        if not runs:
            raise ConfigError(f"compare folder {compares[0]} holds no run directory")
        return runs
    labels = [shown(p.resolve().name) for p in paths]
    if len(set(labels)) < len(labels):  # two runs of one name in different folders
        labels = [shown(str(p)) for p in paths]
    return [load_run(p, label) for p, label in zip(paths, labels)]


def shown(text: str) -> str:
    """``text`` as it reads. Under an ASCII locale without Python's UTF-8 mode, a path's
    non-ASCII bytes arrive as lone surrogates ('r\\udcc3\\udcbcn' for 'rün'), which
    matplotlib cannot draw and UTF-8 cannot encode: they are decoded as the UTF-8 they
    almost always are (anything else becomes U+FFFD)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
