"""GenEval-style per-skill scores of a shapes model before (or after) RL.

Euler ODE sampling on ``linspace(1, 0, steps + 1)`` (shift 1) with fixed noise; reports, per
skill and split (trained / held-out prompts), the strict accuracy (every sub-condition met,
GenEval's binary score), the soft score (the ``shapes_geneval`` reward) and the pass rate of
each kind of sub-condition, for the RL setting (10 steps, no guidance) and guidance 3.0.
Also the detector's accuracy on freshly rendered ground-truth scenes of the same prompts,
and the network's size and forward time.

    python benchmarks/shapes_base_scores.py                    # the shipped base model
    python benchmarks/shapes_base_scores.py --run runs/dppo-shapes-...   # a trained run
    python benchmarks/shapes_base_scores.py -n 8 --json out.json
"""

from __future__ import annotations

import time

import base_scores
import numpy as np
import torch

from flowdppo.tasks.shapes import (
    HELDOUT_PROMPTS,
    SKILLS,
    TRAIN_PROMPTS,
    check_images,
    evaluate_prompts,
    layout,
    load_base_model,
    parse_prompt,
    render,
    skill_summary,
    smoothness,
)

COLUMNS = [*SKILLS, "overall"]
KINDS = ("present", "colour", "count", "position", "exclusive")


def ground_truth(prompts: list[str], n: int, seed: int) -> dict[str, dict[str, float]]:
    """The detector on rendered scenes: ``n`` random layouts per prompt."""
    rng = np.random.default_rng(seed)
    batch = [p for p in prompts for _ in range(n)]
    images = np.stack([render(layout(parse_prompt(p), rng)) for p in batch])
    return skill_summary(check_images(torch.from_numpy(images), batch))


def print_table(title: str, summary: dict[str, dict[str, float]]) -> None:
    print(f"  {title:<34}" + "".join(f"{c[:12]:>13}" for c in COLUMNS))
    for key in ("strict", "soft", *KINDS):
        cells = [
            f"{summary[c][key]:13.3f}" if c in summary and key in summary[c] else " " * 13
            for c in COLUMNS
        ]
        print(f"    {key:<32}" + "".join(cells))


def main() -> None:
    ns = base_scores.parser(__doc__, samples=32, guidance="1.0,3.0").parse_args()
    model, report = base_scores.load(ns, load_base_model, TRAIN_PROMPTS, calls=10, warmup=10)

    def score(split: str, prompts: list[str], g: float, start: float) -> dict:
        summary, _, images = evaluate_prompts(
            model,
            prompts,
            samples_per_prompt=ns.n,
            steps=ns.steps,
            guidance_scale=g,
            seed=ns.seed,
        )
        batch = [q for q in prompts for _ in range(ns.n)]
        summary["overall"]["smoothness"] = float(smoothness(images, batch).mean())
        print_table(
            f"{split} ({len(prompts)} prompts, {time.perf_counter() - start:.0f} s)", summary
        )
        print(f"    {'shapes_smoothness':<32}{summary['overall']['smoothness']:13.3f}")
        return summary

    splits = {"train": TRAIN_PROMPTS, "heldout": HELDOUT_PROMPTS}
    truth = ("overall", "detector", "scenes")
    base_scores.score_splits(ns, report, splits, ground_truth, truth, score)
    base_scores.write_json(ns, report)


if __name__ == "__main__":
    main()
