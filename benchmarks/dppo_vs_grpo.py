"""Flow-DPPO and Flow-GRPO side by side on one task, budget and seed.

Reports reward before/after, KL to the reference, wall time per phase, the model forward
and backward counts, and the ratio of Flow-DPPO's update-phase time to Flow-GRPO's (the
KL needs no extra forward, so it should stay within a few percent). The two algorithms run
alternately ``--repeats`` times so that machine noise hits both alike.

    python benchmarks/dppo_vs_grpo.py                     # the default digits task
    python benchmarks/dppo_vs_grpo.py --repeats 2 train.iterations=20
    python benchmarks/dppo_vs_grpo.py --sd3 --repeats 3   # a random SD3 model through diffusers

``--sd3`` builds a random SD3 pipeline offline (4 transformer layers of width 64, tiny text
encoders; see ``tests/tiny_pipelines.py``), saves it, and trains it through the ``prompts``
task at 64 px with the JPEG-compressibility reward: the same model path a user's SD3.5 run
takes, small enough for a CPU.
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
ROOT = Path(__file__).resolve().parents[1]
SD3_PROMPTS = ["a red cat", "two dogs on grass", "a house by a lake", "a bowl of fruit"]


def sd3_overrides(root: Path) -> list[str]:
    """Build and save a random SD3 pipeline and prompt files; the overrides that train it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pipelines import build_sd3

    path = build_sd3(root / "sd3", layers=4, heads=4, head_dim=16)
    train, held = root / "train.txt", root / "heldout.txt"
    train.write_text("\n".join(SD3_PROMPTS[:3]) + "\n")
    held.write_text(SD3_PROMPTS[3] + "\n")
    return [
        "task=prompts",
        "model.kind=sd3",
        f"model.path={path}",
        "model.resolution=64",
        "model.dtype=float32",
        "model.device=cpu",
        "model.max_sequence_length=16",
        f"data.train_prompts={train}",
        f"data.heldout_prompts={held}",
        "reward.names=[jpeg_compressibility]",
        "train.iterations=6",
        "train.prompts_per_iteration=2",
        "train.group_size=4",
        "train.minibatch_size=4",
        "train.lr=3e-4",
        "log.eval_every=0",
        "log.eval_samples_per_prompt=2",
    ]


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


def paired_update_timing(overrides: list[str], root: Path, pairs: int) -> dict:
    """Time the update phase of both objectives on one rollout, alternating, ``pairs`` times.

    Whole training runs see the machine's load drift between them; here each DPPO update is
    timed next to a GRPO update on the same rollout, model state and minibatches, so the
    ratio of the medians isolates what the objective itself costs.
    """
    torch.set_num_threads(1)
    from dataclasses import replace

    from flowdppo import schedule
    from flowdppo.trainer.rollout import rollout
    from flowdppo.trainer.update import step_loss

    cfg = load_config(None, ["algorithm=dppo", "log.tensorboard=false", *overrides])
    trainer = Trainer(cfg, root / "paired")
    gen = torch.Generator().manual_seed(0)
    prompts, group = trainer._draw_prompts()
    steps = schedule.choose_sde_steps(
        cfg.sampler.num_steps, cfg.sampler.num_sde_steps, cfg.sampler.sde_window, gen
    )
    ro = rollout(trainer.model, prompts, group, trainer.spec, steps, gen, trainer.counter)
    adv = torch.randn(ro.batch_size, generator=gen).to(ro.final.device)
    objectives = {
        "dppo": trainer.objective,
        "grpo": replace(trainer.objective, name="clip"),
    }

    def update(objective) -> float:
        # CPU time of this process: on a shared machine it is far less disturbed by other
        # jobs than wall time (the benchmark runs torch on one thread).
        start = time.process_time()
        for first in range(0, ro.batch_size, cfg.train.minibatch_size):
            idx = torch.arange(first, min(first + cfg.train.minibatch_size, ro.batch_size))
            for i in range(len(ro.sde_steps)):
                loss, _ = step_loss(
                    trainer.model, ro, idx, i, adv, trainer.spec, objective, trainer.counter
                )
                loss.mean().backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start

    update(objectives["dppo"])  # warm-up
    times: dict[str, list[float]] = {"dppo": [], "grpo": []}
    for k in range(pairs):
        for name in ("dppo", "grpo") if k % 2 == 0 else ("grpo", "dppo"):
            times[name].append(update(objectives[name]))
    med = {name: statistics.median(t) for name, t in times.items()}
    per_pair = sorted(d / g for d, g in zip(times["dppo"], times["grpo"]))
    q1, _, q3 = statistics.quantiles(per_pair, n=4)
    return {
        "pairs": pairs,
        "median_update_cpu_s": med,
        "update_time_ratio_dppo_over_grpo": statistics.median(per_pair),
        "per_pair_ratio_quartiles": [q1, q3],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.iterations=20")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=30, help="paired update timings")
    ap.add_argument("--sd3", action="store_true", help="a random SD3 model instead of digits")
    ap.add_argument("--out", default=None, help="JSON results (default docs/results/...)")
    ns = ap.parse_args()
    default_out = "dppo_vs_grpo_sd3.json" if ns.sd3 else "dppo_vs_grpo.json"
    ns.out = ns.out or f"docs/results/{default_out}"
    results: dict[str, list[dict]] = {a: [] for a in ALGORITHMS}
    with tempfile.TemporaryDirectory() as tmp:
        if ns.sd3:
            ns.overrides = sd3_overrides(Path(tmp)) + ns.overrides
        for rep in range(ns.repeats):
            order = ALGORITHMS if rep % 2 == 0 else ALGORITHMS[::-1]
            for algorithm in order:
                print(
                    f"[repeat {rep + 1}/{ns.repeats}] {algorithm} ...", file=sys.stderr, flush=True
                )
                results[algorithm].append(run_once(algorithm, ns.overrides, Path(tmp), str(rep)))
        print("paired update timing ...", file=sys.stderr, flush=True)
        paired = paired_update_timing(ns.overrides, Path(tmp), ns.pairs)

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
        "update_time_ratio_dppo_over_grpo_whole_runs": ratio,
        "paired_update_timing": paired,
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
    print(f"\nupdate-phase time ratio DPPO / GRPO, whole runs: {ratio:.3f}")
    paired_ratio = paired["update_time_ratio_dppo_over_grpo"]
    q1, q3 = paired["per_pair_ratio_quartiles"]
    print(
        f"update-phase time ratio DPPO / GRPO, paired on one rollout: {paired_ratio:.3f} "
        f"(quartiles of the {paired['pairs']} pairs: {q1:.3f}-{q3:.3f})"
    )
    print(f"forward/backward counts equal: {report['forward_backward_counts_equal']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
