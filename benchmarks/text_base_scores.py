"""Per-length OCR scores of a text-task model before (or after) RL.

Euler ODE sampling (10 steps, the model's shift 3) with fixed noise; reports, per word
length (3, 5, 8 letters) and split (trained / held-out words), the mean ``ocr`` reward
(1 - normalised edit distance) and the exact-read rate, at guidance 1 (the RL setting) and
2. Also the OCR reward on ground-truth renders of the same words (the canonical style and
random pretraining styles), and the network's size and forward time. With ``--grid`` it
writes a grid of the first samples with what the OCR read and the reward under each.

    python benchmarks/text_base_scores.py                    # the shipped base model
    python benchmarks/text_base_scores.py --run runs/dppo-text-...   # a trained run
    python benchmarks/text_base_scores.py -n 4 --json out.json --grid base.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from flowdppo.rewards import get_reward
from flowdppo.tasks.common import euler_sample
from flowdppo.tasks.text import (
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    length_group,
    load_base_model,
    render,
    sample_style,
    word_of,
)
from flowdppo.trainer.media import write_grid

GROUPS = ("len3", "len5", "len8")


def forward_ms(model, batch: int = 64, rounds: int = 5) -> float:
    x = torch.randn(batch, 1, 32, 128, generator=torch.Generator().manual_seed(0))
    sigma = torch.rand(batch, generator=torch.Generator().manual_seed(1))
    cond = model.encode([TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)] for i in range(batch)])
    with torch.no_grad():
        model.velocity(x, sigma, cond)
        best = float("inf")
        for _ in range(rounds):  # best of the rounds: the machine is shared
            start = time.perf_counter()
            model.velocity(x, sigma, cond)
            best = min(best, time.perf_counter() - start)
    return 1000 * best


def summary(ocr, images: torch.Tensor, prompts: list[str]) -> dict[str, dict[str, float]]:
    scores = ocr(images, prompts)
    read = ocr.annotate(images, prompts)
    out = {}
    for g in (*GROUPS, "all"):
        rows = [i for i, p in enumerate(prompts) if g == "all" or length_group(p) == g]
        exact = [read[i].replace(" ", "").lower() == word_of(prompts[i]) for i in rows]
        out[g] = {
            "reward": round(float(scores[rows].mean()), 4),
            "exact": round(float(np.mean(exact)), 4),
            "n": len(rows),
        }
    return out


def print_row(title: str, s: dict[str, dict[str, float]]) -> None:
    cells = "".join(f"{s[g]['reward']:8.3f} ({s[g]['exact']:.2f})" for g in (*GROUPS, "all"))
    print(f"  {title:<28}{cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", default="1.0,2.0", help="comma-separated guidance scales")
    p.add_argument("--weights", help="base weights file (default: the shipped ones)")
    p.add_argument("--run", help="a training run directory: score its latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--grid", help="write a grid of guidance-1 samples (trained words) here")
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    if ns.run:
        from flowdppo.runs import load_run

        _, _, model, iteration = load_run(ns.run)
        source = f"run {ns.run} (iteration {iteration})"
    else:
        model = load_base_model(ns.weights)
        source = f"base model {ns.weights or '(shipped)'}"
    ocr = get_reward("ocr", threads=ns.threads)
    report: dict = {
        "source": source,
        "params": sum(q.numel() for q in model.module.parameters()),
        "forward_ms_batch64": round(forward_ms(model), 2),
        "samples_per_prompt": ns.n,
        "steps": ns.steps,
        "ground_truth": {},
        "settings": {},
    }
    print(
        f"{source}: {report['params']:,} parameters, forward on 64: "
        f"{report['forward_ms_batch64']:.1f} ms ({ns.threads} threads)"
    )
    print(f"  {'':<28}" + "".join(f"{g:>15}" for g in (*GROUPS, "all")) + "   reward (exact)")
    rng = np.random.default_rng(ns.seed)
    for split, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        for style in ("canonical", "pretraining styles"):
            batch = [q for q in prompts for _ in range(ns.n if style != "canonical" else 1)]
            images = torch.stack(
                [
                    torch.from_numpy(
                        render(word_of(q), *(() if style == "canonical" else (sample_style(rng),)))
                    )[None]
                    for q in batch
                ]
            )
            s = summary(ocr, images, batch)
            report["ground_truth"][f"{split}, {style}"] = s
            print_row(f"renders, {split}, {style}", s)
    for g in (float(v) for v in ns.guidance.split(",")):
        label = f"{ns.steps} steps, guidance {g}"
        report["settings"][label] = {}
        for split, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
            batch = [q for q in prompts for _ in range(ns.n)]
            gen = torch.Generator().manual_seed(ns.seed)
            images = euler_sample(model, batch, ns.steps, g, gen)
            s = summary(ocr, images, batch)
            report["settings"][label][split] = s
            print_row(f"{label}, {split}", s)
            if ns.grid and split == "train" and g == 1.0:
                keep = [i for i in range(len(batch)) if i % ns.n < min(ns.n, 4)]
                sub, caps = images[keep], [batch[i] for i in keep]
                write_grid(
                    sub,
                    caps,
                    Path(ns.grid),
                    columns=min(ns.n, 4),
                    rewards=ocr(sub, caps),
                    notes=ocr.annotate(sub, caps),
                )
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
