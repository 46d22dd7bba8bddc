"""Per-attribute scores of a motion model before (or after) RL.

Euler ODE sampling (10 steps, the model's shift) with fixed noise; reports, per group (one
or two objects, and all) and split (trained / held-out prompts), the strict accuracy (every
sub-condition met: ``motion_strict``), the soft score (the ``motion`` reward) and the pass
rate of each attribute: colour, shape, size, direction, speed, count. Also the reward on
freshly rendered ground-truth clips of the same prompts, and the network's size and forward
time. With ``--grid`` it writes the first samples (trained prompts, guidance 1) as a grid
(PNG of the middle frame, GIF and MP4) with each sample's reward under it.

    python benchmarks/motion_base_scores.py                    # the shipped base model
    python benchmarks/motion_base_scores.py --run runs/dppo-motion-...   # a trained run
    python benchmarks/motion_base_scores.py -n 4 --json out.json --grid base.png
"""

from __future__ import annotations

import time
from pathlib import Path

import base_scores
import numpy as np
import torch

from flowdppo.tasks.common import euler_sample
from flowdppo.tasks.motion import (
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    check_clips,
    layout,
    load_base_model,
    render_clip,
    summary,
)
from flowdppo.tasks.motion.score import ATTRIBUTES
from flowdppo.trainer.media import write_grid

COLUMNS = ("one", "two", "all")


def ground_truth(prompts: list[str], n: int, seed: int) -> dict[str, dict[str, float]]:
    """The reward on rendered clips: ``n`` random trajectories per prompt."""
    rng = np.random.default_rng(seed)
    batch = [p for p in prompts for _ in range(n)]
    clips = np.stack([render_clip(layout(p, rng)) for p in batch])
    return summary(check_clips(torch.from_numpy(clips), batch))


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"  {title:<34}" + "".join(f"{c:>9}" for c in COLUMNS))
    for key in ("strict", "soft", *ATTRIBUTES):
        cells = [
            f"{table[c][key]:9.3f}" if c in table and key in table[c] else " " * 9 for c in COLUMNS
        ]
        print(f"    {key:<32}" + "".join(cells))


def main() -> None:
    p = base_scores.parser(__doc__, samples=8, guidance="1.0,3.0")
    p.add_argument("--grid", help="write a grid of guidance-1 samples (trained prompts) here")
    ns = p.parse_args()
    model, report = base_scores.load(ns, load_base_model, TRAIN_PROMPTS)

    def score(split: str, prompts: list[str], g: float, start: float) -> dict:
        batch = [q for q in prompts for _ in range(ns.n)]
        gen = torch.Generator().manual_seed(ns.seed)
        clips = euler_sample(model, batch, ns.steps, g, gen)
        checks = check_clips(clips, batch)
        table = summary(checks)
        print_table(f"{split} ({len(prompts)} prompts, {time.perf_counter() - start:.0f} s)", table)
        if ns.grid and split == "train" and g == 1.0:
            keep = [i for i in range(len(batch)) if i % ns.n < min(ns.n, 4)][:48]
            write_grid(
                clips[keep],
                [batch[i] for i in keep],
                Path(ns.grid),
                columns=min(ns.n, 4),
                rewards=torch.tensor([checks[i].soft for i in keep]),
            )
        return table

    splits = {"train": TRAIN_PROMPTS, "heldout": HELDOUT_PROMPTS}
    truth = ("all", "reward", "clips")
    base_scores.score_splits(ns, report, splits, ground_truth, truth, score)
    base_scores.write_json(ns, report)


if __name__ == "__main__":
    main()
