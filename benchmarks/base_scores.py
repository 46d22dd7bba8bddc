"""What the built-in tasks' base-score benchmarks share (``shapes_base_scores.py``,
``text_base_scores.py``): the command line, the model scored (the shipped base model, a
weights file, or a training run's latest checkpoint), its size and forward time, and the
report. Each script adds its task's own scoring; both run as ``python benchmarks/NAME.py``,
which puts this folder on the import path.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flowdppo.models.base import FlowModel


def parser(doc: str, samples: int, guidance: str) -> argparse.ArgumentParser:
    """The options every base-score benchmark takes; a script adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("-n", type=int, default=samples, help=f"samples per prompt (default {samples})")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", default=guidance, help="comma-separated guidance scales")
    p.add_argument("--weights", help="base weights file (default: the shipped ones)")
    p.add_argument("--run", help="a training run directory: score its latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the numbers here")
    return p


def forward_ms(
    model: FlowModel, prompts: list[str], batch: int = 64, calls: int = 1, warmup: int = 1
) -> float:
    """Milliseconds of one forward on ``batch`` samples: the best of 5 rounds of ``calls``
    forwards (the machine is shared), after ``warmup`` forwards."""
    x = model.initial_noise(batch, torch.Generator().manual_seed(0))
    sigma = torch.rand(batch, generator=torch.Generator().manual_seed(1))
    cond = model.encode([prompts[i % len(prompts)] for i in range(batch)])
    with torch.no_grad():
        for _ in range(warmup):
            model.velocity(x, sigma, cond)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                model.velocity(x, sigma, cond)
            best = min(best, (time.perf_counter() - start) / calls)
    return 1000 * best


def load(
    ns: argparse.Namespace,
    load_base_model: Callable[[str | None], FlowModel],
    prompts: list[str],
    **timing: int,
) -> tuple[FlowModel, dict]:
    """The model the options name and the report's opening: its source, size, forward time
    (on ``prompts``, ``timing`` as :func:`forward_ms` takes it) and the sampling settings."""
    torch.set_num_threads(ns.threads)
    if ns.run:
        from flowdppo.runs import load_run

        _, _, model, iteration = load_run(ns.run)
        source = f"run {ns.run} (iteration {iteration})"
    else:
        model = load_base_model(ns.weights)
        source = f"base model {ns.weights or '(shipped)'}"
    report = {
        "source": source,
        "params": sum(q.numel() for q in model.module.parameters()),
        "forward_ms_batch64": round(forward_ms(model, prompts, **timing), 2),
        "samples_per_prompt": ns.n,
        "steps": ns.steps,
    }
    print(
        f"{source}: {report['params']:,} parameters, forward on 64: "
        f"{report['forward_ms_batch64']:.1f} ms ({ns.threads} threads)"
    )
    return model, report


def settings(ns: argparse.Namespace) -> list[tuple[str, float]]:
    """(label, guidance scale) of every sampling setting the options ask for."""
    return [(f"{ns.steps} steps, guidance {float(g)}", float(g)) for g in ns.guidance.split(",")]


def score_splits(
    ns: argparse.Namespace,
    report: dict,
    splits: dict[str, list[str]],
    ground_truth: Callable[[list[str], int, int], dict],
    truth: tuple[str, str, str],
    score: Callable[[str, list[str], float, float], dict],
) -> None:
    """The body the task benchmarks share. The reward on freshly rendered ground truth of
    each split (``ground_truth(prompts, n, seed)``; ``truth`` = (its overall key, what is
    scored, a noun for the samples), then, per guidance setting and split,
    ``score(split, prompts, guidance, start)`` -> the split's table (``start``: its clock)."""
    key, what, noun = truth
    report["prompts"] = {split: len(prompts) for split, prompts in splits.items()}
    report["ground_truth"], report["settings"] = {}, {}
    for split, prompts in splits.items():
        gt = ground_truth(prompts, ns.n, ns.seed)
        report["ground_truth"][split] = gt
        print(
            f"{what} on rendered ground truth ({split}, {int(gt[key]['n'])} {noun}): "
            f"strict {gt[key]['strict']:.4f}"
        )
    for label, g in settings(ns):
        report["settings"][label] = {}
        print(f"\n{label}")
        for split, prompts in splits.items():
            report["settings"][label][split] = score(split, prompts, g, time.perf_counter())


def write_json(ns: argparse.Namespace, report: dict) -> None:
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=1) + "\n")
