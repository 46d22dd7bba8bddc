"""Thread counts on a shared machine: one text run alone and two started together, with one
thread, two threads, and the governor (``train.threads: null``, trainer/threads.py).

Each case starts its runs as fresh subprocesses of ``flowdppo train --task text`` with
``train.iterations=N`` and no evaluation after the base one, ``OMP_NUM_THREADS`` removed;
a case's wall time is from the first start to the last end. For the governed runs the
thread counts their iterations ran with are read from ``metrics.jsonl``.

    python benchmarks/threads_contention.py --iterations 3 --json docs/results/threads_contention.json

Run it on an otherwise idle machine: the point is what the runs do to each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    ("alone, 1 thread", 1, "1"),
    ("alone, 2 threads", 1, "2"),
    ("alone, governed", 1, None),
    ("two together, 1 thread each", 2, "1"),
    ("two together, 2 threads each", 2, "2"),
    ("two together, governed", 2, None),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--task", default="text")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = {"task": args.task, "iterations": args.iterations, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for label, runs, threads in CASES:
            dirs = [Path(tmp) / f"{len(out['cases'])}-{i}" for i in range(runs)]
            cmd = [sys.executable, "-m", "flowdppo", "train", "--task", args.task]
            cmd += [f"train.iterations={args.iterations}", "log.eval_every=0"]
            cmd += [f"log.checkpoint_every={args.iterations}"]
            if threads:
                cmd.append(f"train.threads={threads}")
            start = time.perf_counter()
            procs = [
                subprocess.Popen([*cmd, f"log.run_dir={d}"], env=env, stdout=subprocess.DEVNULL)
                for d in dirs
            ]
            if any(p.wait() for p in procs):
                raise SystemExit(f"{label}: a run failed")
            wall = time.perf_counter() - start
            counts = []
            for d in dirs:
                lines = (d / "metrics.jsonl").read_text().splitlines()
                counts.append([json.loads(line).get("threads") for line in lines])
            out["cases"].append({"case": label, "wall_s": wall, "threads": counts})
            print(f"{label}: {wall:.1f} s, threads per iteration {counts}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
