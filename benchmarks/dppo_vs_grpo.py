"""Flow-DPPO and Flow-GRPO side by side on one task, budget and seed.

Reports reward before/after, KL to the reference, wall time per phase, the model forward
and backward counts, and the ratio of Flow-DPPO's update-phase time to Flow-GRPO's (the
KL needs no extra forward, so it should stay within a few percent). The two algorithms run
alternately ``--repeats`` times so that machine noise hits both alike.

    python benchmarks/dppo_vs_grpo.py                     # the default digits task
    python benchmarks/dppo_vs_grpo.py --repeats 2 train.iterations=20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from flowdppo.config import load_config
from flowdppo.trainer.loop import Trainer, metrics_of

ALGORITHMS = ("dppo", "grpo")


def run_once(algorithm: str, overrides: list[str], root: Path, tag: str) -> dict:
    cfg = load_config(None, [f"algorithm={algorithm}", "log.tensorboard=false", *overrides])
    run_dir = root / f"{algorithm}-{tag}"
    start = time.perf_counter()
    summary = Trainer(cfg, run_dir).train()
    wall = time.perf_counter() - start
    rows = metrics_of(run_dir)
    return {
        "wall_s": wall,
        "summary": summary,
        "update_s_per_iter": statistics.mean(r["time/update"] for r in rows),
        "rollout_s_per_iter": statistics.mean(r["time/rollout"] for r in rows),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.iterations=20")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="docs/results/dppo_vs_grpo.json")
    ns = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, list[dict]] = {a: [] for a in ALGORITHMS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(ns.repeats):
            order = ALGORITHMS if rep % 2 == 0 else ALGORITHMS[::-1]
            for algorithm in order:
                print(
                    f"[repeat {rep + 1}/{ns.repeats}] {algorithm} ...", file=sys.stderr, flush=True
                )
                results[algorithm].append(run_once(algorithm, ns.overrides, Path(tmp), str(rep)))

    def mean(alg: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[alg])

    def after(alg: str, key: str) -> float:
        return statistics.mean(r["summary"]["after"][key] for r in results[alg])

    def before(alg: str, key: str) -> float:
        return statistics.mean(r["summary"]["before"][key] for r in results[alg])

    ratio = mean("dppo", "update_s_per_iter") / mean("grpo", "update_s_per_iter")
    counts = {a: results[a][0]["summary"]["counts"] for a in ALGORITHMS}
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "repeats": ns.repeats,
        "update_time_ratio_dppo_over_grpo": ratio,
        "forward_backward_counts_equal": counts["dppo"] == counts["grpo"],
        "per_algorithm": {
            a: {
                "train_reward_before": before(a, "eval/train/reward/mean"),
                "train_reward_after": after(a, "eval/train/reward/mean"),
                "heldout_reward_before": before(a, "eval/heldout/reward/mean"),
                "heldout_reward_after": after(a, "eval/heldout/reward/mean"),
                "kl_ref_after": after(a, "eval/train/kl_ref/mean"),
                "wall_s": mean(a, "wall_s"),
                "rollout_s_per_iter": mean(a, "rollout_s_per_iter"),
                "update_s_per_iter": mean(a, "update_s_per_iter"),
                "time_per_phase_s": results[a][0]["summary"]["time_per_phase_s"],
                "counts": counts[a],
            }
            for a in ALGORITHMS
        },
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n| | {' | '.join(ALGORITHMS)} |\n|---|---|---|")
    for key in (
        "train_reward_before",
        "train_reward_after",
        "heldout_reward_before",
        "heldout_reward_after",
        "kl_ref_after",
        "rollout_s_per_iter",
        "update_s_per_iter",
        "wall_s",
    ):
        vals = " | ".join(f"{report['per_algorithm'][a][key]:.4g}" for a in ALGORITHMS)
        print(f"| {key} | {vals} |")
    print(f"\nupdate-phase time ratio DPPO / GRPO: {ratio:.3f}")
    print(f"forward/backward counts equal: {report['forward_backward_counts_equal']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
