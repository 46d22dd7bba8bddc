"""``flowdppo report``: one self-contained report.html for runs or a compare folder.

See README.md in this folder.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flowdppo.config import ConfigError
from flowdppo.report.runs import collect, is_compare_dir, shown
from flowdppo.trainer.checkpoint import write_text_atomic

__all__ = ["write_report"]


def default_out(paths: list[Path]) -> Path:
    """Inside the run or compare folder when there is one; else in the current folder."""
    return paths[0] / "report.html" if len(paths) == 1 else Path("report.html")


def write_report(
    paths: list[str | Path], out: str | Path | None = None, command: str | None = None
) -> Path:
    from flowdppo.report.page import render

    paths = [Path(p) for p in paths]
    runs = collect(paths)  # one error line for a bad path, before anything is drawn
    groups: dict = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    if len(paths) == 1 and is_compare_dir(paths[0]):
        title = f"flowdppo compare: {paths[0].resolve().name}"
    elif len(runs) == 1:
        title = f"flowdppo run: {runs[0].label}"
    else:
        title = f"flowdppo: {len(runs)} runs"
    command = command or shlex.join(["flowdppo", "report", *map(str, paths)])
    out = Path(out) if out else default_out(paths)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name the HTML file, e.g. {out}/report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, shown(render(groups, title, command)))
    return out
