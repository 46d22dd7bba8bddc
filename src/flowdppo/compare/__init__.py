"""Algorithms side by side: ``flowdppo compare`` (see README.md in this folder)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from flowdppo.compare.experiment import (
    DEFAULT_ALGORITHMS,
    Experiment,
    RunSpec,
    Variant,
    load_experiment,
)
from flowdppo.config import ConfigError

__all__ = [
    "DEFAULT_ALGORITHMS",
    "Experiment",
    "RunSpec",
    "Variant",
    "load_experiment",
    "compare",
]


def compare(
    config: str | Path,
    *,
    algorithms: str | list | None = None,
    seeds: int | str | list | None = None,
    quick: bool = False,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    jobs: int = 1,
    reuse: bool = False,
    command: str | None = None,
    echo=print,
) -> tuple[int, dict[str, Path]]:
    """Run the experiment and write its report; (exit code, written paths).

    The exit code is 0 when every run finished and 1 when any failed (the report still
    lists every run, failed ones with their error).
    """
    from flowdppo.compare.report import summary_table, write_report
    from flowdppo.compare.runner import run_all

    if jobs < 0:
        raise ConfigError(f"--jobs must be >= 0 (0: in this process), got {jobs}")
    exp = load_experiment(
        config, algorithms=algorithms, seeds=seeds, quick=quick, overrides=overrides
    )
    mode = "quick" if quick else "full"
    out_dir = Path(out or f"runs/compare-{exp.name}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = exp.plan(out_dir)  # validates every run's config before anything runs
    _check_registries(runs)
    if out_dir.exists() and any(out_dir.iterdir()) and not reuse:
        raise ConfigError(
            f"output folder {out_dir} is not empty: choose another --out, delete it, or pass "
            "--reuse to keep its finished runs and run only the rest"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    echo(
        f"flowdppo compare: {exp.name} ({mode}), {len(runs)} runs "
        f"({len(exp.groups())} groups x {len(exp.seeds)} seeds), jobs {jobs} -> {out_dir}"
    )
    statuses = run_all(runs, out_dir, jobs=jobs, probe=exp.probe, reuse=reuse, echo=echo)
    command = command or shlex.join(["flowdppo", "compare", *sys.argv[2:]])
    paths = write_report(exp, statuses, out_dir, command)
    failed = [s for s in statuses if not s.ok]
    echo("\n" + summary_table(exp, statuses) + "\n")
    echo(
        f"wrote {paths['md']}, {paths['csv']} and {sum(str(p).endswith('.png') for p in paths.values())} plots"
    )
    if failed:
        echo(f"{len(failed)} of {len(statuses)} runs FAILED; see the table and {out_dir}/logs/")
        return 1, paths
    return 0, paths


def _check_registries(runs: list[RunSpec]) -> None:
    """Unknown tasks and rewards fail here, before any run starts."""
    from flowdppo.rewards import available_rewards
    from flowdppo.tasks import available_tasks

    tasks, rewards = available_tasks(), available_rewards()
    for spec in runs:
        cfg = spec.config
        if cfg.task not in tasks:
            raise ConfigError(
                f"run {spec.group!r}: unknown task {cfg.task!r}; available: {', '.join(tasks)}"
            )
        for name in cfg.reward.names:
            if name not in rewards:
                raise ConfigError(
                    f"run {spec.group!r}: unknown reward {name!r}; available: {', '.join(rewards)}"
                )
