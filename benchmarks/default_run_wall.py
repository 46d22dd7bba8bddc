"""The built-in tasks' default runs at two commits, side by side: wall time and numbers.

Each commit is checked out into a temporary git worktree (outside the working directory)
and its ``flowdppo train --task TASK`` runs as a fresh subprocess with that worktree's
``src`` first on ``PYTHONPATH``, the same interpreter and packages for both. Runs alternate
(old, new for one pair, new, old for the next, and the first task's order flips for the
second task) so that a shared machine's load falls on both commits. Per run: the wall time
of the subprocess (start-up, base evaluation, training, evaluations, checkpoints), the
phase times and evaluation numbers from its ``summary.json``, and the torch thread counts
its iterations ran with (``metrics.jsonl``, ``threads``; absent before that key existed).
Per task: the median over pairs of the wall ratio new / old, and the largest difference
between the two commits' evaluation numbers (0 when the change leaves what is measured
alone).

    python benchmarks/default_run_wall.py cd5c8e0 HEAD --tasks text,shapes --pairs 1 \\
        --json docs/results/default_run_wall.json

``OMP_NUM_THREADS`` is removed from the runs' environment: each commit chooses its own
thread count, as a user's run would. The run directories go to a temporary folder.
``--old-override`` / ``--new-override KEY=VALUE`` (repeatable) add config overrides to one
side's command, so that one commit with and without an option runs side by side (the share
of that option):

    python benchmarks/default_run_wall.py HEAD HEAD --tasks shapes \
        --old-override train.fuse_steps=false
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worktree(commit: str, where: Path) -> Path:
    path = where / f"tree-{commit}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
        check=True,
        capture_output=True,
    )
    return path


def run(tree: Path, task: str, run_dir: Path, overrides: list[str] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(tree / "src")
    cmd = [sys.executable, "-m", "flowdppo", "train", "--task", task, *overrides]
    cmd.append(f"log.run_dir={run_dir}")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    counts: dict[int, int] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        n = json.loads(line).get("threads")
        if n is not None:
            counts[int(n)] = counts.get(int(n), 0) + 1
    return {
        "wall_s": wall,
        "load_at_start": load,
        "time_per_phase_s": summary["time_per_phase_s"],
        "before": summary["before"],
        "after": summary["after"],
        "iterations_by_threads": counts,
    }


def largest_difference(a: dict, b: dict) -> float:
    diffs = [0.0]
    for when in ("before", "after"):
        for key, value in a[when].items():
            if key in b[when]:
                diffs.append(abs(value - b[when][key]))
    return max(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--tasks", default="text,shapes")
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--old-override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--new-override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    overrides = {"old": args.old_override, "new": args.new_override}
    results: dict = {"old": args.old, "new": args.new, "overrides": overrides, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        trees = {
            name: worktree(commit, where / name)
            for name, commit in (("old", args.old), ("new", args.new))
        }
        try:
            flip = False
            for task in args.tasks.split(","):
                pairs = []
                for p in range(args.pairs):
                    order = ("old", "new") if (p % 2 == 0) != flip else ("new", "old")
                    pair = {}
                    for side in order:
                        run_dir = where / f"{task}-{side}-{p}"
                        pair[side] = run(trees[side], task, run_dir, overrides[side])
                        print(f"{task} pair {p} {side}: {pair[side]['wall_s']:.1f} s", flush=True)
                    pair["order"] = list(order)
                    pair["ratio"] = pair["new"]["wall_s"] / pair["old"]["wall_s"]
                    pair["largest_eval_difference"] = largest_difference(pair["old"], pair["new"])
                    pairs.append(pair)
                flip = not flip
                ratio = statistics.median(p["ratio"] for p in pairs)
                diff = max(p["largest_eval_difference"] for p in pairs)
                results["tasks"][task] = {
                    "median_ratio": ratio,
                    "largest_eval_difference": diff,
                    "pairs": pairs,
                }
                print(
                    f"{task}: wall new / old {ratio:.3f} (median of {len(pairs)}); largest "
                    f"evaluation difference {diff:.3g}",
                    flush=True,
                )
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
