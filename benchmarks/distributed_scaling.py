"""Throughput of 1 process against 2 processes (torchrun, gloo, CPU) on the digits task.

Both runs train the same global batch (``train.prompts_per_iteration x train.group_size``
samples per iteration) with one thread per process; the 2-process run gives each process
half of it. Throughput is global samples per second of training iteration (rollout,
reward, reference KL and update; start-up and evaluations excluded), taken from each run's
``metrics.jsonl`` (rank 0's clock, which includes its waits for the other process). The
two settings run alternately ``--repeats`` times and the load average of the machine is
recorded around every run, because on a shared machine the other users' load decides
what a second process can add.

    python benchmarks/distributed_scaling.py                       # 3 repeats, 20 iterations
    python benchmarks/distributed_scaling.py --repeats 5 train.iterations=40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flowdppo.trainer.runlog import read_metrics

BASE = [
    "task=digits",
    "train.iterations=20",
    "train.threads=1",
    "log.eval_every=0",
    "log.eval_samples_per_prompt=2",
    "log.checkpoint_every=1000",
    "log.tensorboard=false",
]


def run_once(processes: int, overrides: list[str], run_dir: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if processes == 1:
        launch = [sys.executable, "-m", "flowdppo", "train"]
    else:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "flowdppo",
            "train",
        ]
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(
        [*launch, *BASE, *overrides, f"log.run_dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{processes}-process run failed:\n{done.stderr[-3000:]}")
    rows = read_metrics(run_dir / "metrics.jsonl")
    per_iter = [r["time/iteration"] for r in rows[1:]]  # the first iteration warms up
    if rows[0].get("dist/world_size", 1) != processes:
        raise SystemExit(f"expected {processes} processes, the run logged another number")
    return {
        "processes": processes,
        "median_iteration_s": statistics.median(per_iter),
        "median_phase_s": {
            phase: statistics.median(r.get(f"time/{phase}", 0.0) for r in rows[1:])
            for phase in ("rollout", "reward", "ref_kl", "update")
        },
        "wall_s_including_startup": wall,
        "load_average_1min_before": load_before[0],
        "load_average_1min_after": os.getloadavg()[0],
        "final_reward_mean": rows[-1]["reward/mean"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.iterations=40")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/results/distributed_scaling.json")
    ns = ap.parse_args()
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(ns.repeats):
            order = (1, 2) if rep % 2 == 0 else (2, 1)
            for n in order:
                print(f"[repeat {rep + 1}/{ns.repeats}] {n} process(es) ...", file=sys.stderr)
                r = run_once(n, ns.overrides, Path(tmp) / f"p{n}-r{rep}")
                print(f"  {json.dumps(r)}", file=sys.stderr, flush=True)
                results[n].append(r)
    from flowdppo.config import load_config

    cfg = load_config(None, [*BASE, *ns.overrides])
    batch = cfg.samples_per_iteration
    summary = {}
    for n, runs in results.items():
        iters = [r["median_iteration_s"] for r in runs]
        summary[n] = {
            "median_iteration_s": statistics.median(iters),
            "samples_per_s": batch / statistics.median(iters),
            "per_repeat_samples_per_s": [batch / t for t in iters],
        }
    ratio = summary[2]["samples_per_s"] / summary[1]["samples_per_s"]
    out = {
        "what": "digits task, global batch of "
        f"{batch} samples per iteration, 1 thread per process, gloo on CPU",
        "overrides": [*BASE, *ns.overrides],
        "throughput_ratio_2_over_1": ratio,
        "summary": {str(k): v for k, v in summary.items()},
        "runs": {str(k): v for k, v in results.items()},
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("throughput_ratio_2_over_1", "summary")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
