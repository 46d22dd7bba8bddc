"""Reward of the shipped digits base model before any RL: the headroom RL has to work with.

Euler ODE sampling on ``linspace(1, 0, steps + 1)`` (shift 1), fixed noise (seed 0); reports
``digit_prob`` and ``digit_smoothness`` per prompt for the RL setting (10 steps, no
guidance) and, for context, with guidance 3.0 and with 50 steps. Also the classifier's
held-out accuracy and the base network's size and forward time.

    python benchmarks/digits_base_reward.py               # 256 samples per prompt
    python benchmarks/digits_base_reward.py -n 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowdppo.tasks.digits import (
    DIGIT_NAMES,
    load_base_model,
    load_classifier,
    load_digits_split,
)
from flowdppo.tasks.digits.evaluate import evaluate_base
from flowdppo.tasks.digits.pretrain import classifier_accuracy

SETTINGS = {
    "10 steps, guidance 1.0 (RL setting)": {"steps": 10, "guidance_scale": 1.0},
    "10 steps, guidance 3.0": {"steps": 10, "guidance_scale": 3.0},
    "50 steps, guidance 1.0": {"steps": 50, "guidance_scale": 1.0},
}


def forward_ms(model, batch: int = 64, repeats: int = 200) -> float:
    x = torch.randn(batch, 1, 8, 8)
    sigma = torch.rand(batch)
    cond = model.encode([DIGIT_NAMES[i % 10] for i in range(batch)])
    with torch.no_grad():
        for _ in range(20):
            model.velocity(x, sigma, cond)
        start = time.perf_counter()
        for _ in range(repeats):
            model.velocity(x, sigma, cond)
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=256, help="samples per prompt (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: tiny ops, shared cores)"
    )
    p.add_argument("--json", help="also write the numbers here")
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)

    model = load_base_model()
    data = load_digits_split()
    report = {
        "params": sum(q.numel() for q in model.module.parameters()),
        "forward_ms_batch64": round(forward_ms(model), 3),
        "classifier_heldout_accuracy": classifier_accuracy(
            load_classifier(), data.x_heldout, data.y_heldout
        ),
        "samples_per_prompt": ns.n,
        "settings": {},
    }
    print(
        f"base model: {report['params']:,} parameters, forward on 64: "
        f"{report['forward_ms_batch64']:.3f} ms; classifier held-out accuracy "
        f"{report['classifier_heldout_accuracy']:.4f} ({len(data.y_heldout)} digits)"
    )
    columns = [*DIGIT_NAMES, "train", "heldout"]
    print(f"\n{'':<38}" + " ".join(f"{c[:5]:>6}" for c in columns))
    for label, kw in SETTINGS.items():
        res = evaluate_base(model, samples_per_prompt=ns.n, seed=ns.seed, **kw)
        report["settings"][label] = res
        for name, per in res.items():
            row = f"{label if name == 'digit_prob' else '':<38}"
            print(row + " ".join(f"{per[c]:6.3f}" for c in columns) + f"  {name}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
