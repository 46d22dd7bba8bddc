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

from pathlib import Path

import base_scores
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
    p = base_scores.parser(__doc__, samples=4, guidance="1.0,2.0")
    p.add_argument("--grid", help="write a grid of guidance-1 samples (trained words) here")
    ns = p.parse_args()
    model, report = base_scores.load(ns, load_base_model, TRAIN_PROMPTS)
    report["ground_truth"], report["settings"] = {}, {}
    ocr = get_reward("ocr", threads=ns.threads)
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
    for label, g in base_scores.settings(ns):
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
    base_scores.write_json(ns, report)


if __name__ == "__main__":
    main()
