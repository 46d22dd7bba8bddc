"""Seeded, reproducible pretraining of the text base model (CPU, one thread, about 6 minutes).

Every step renders a fresh batch of words (both word lists, as a foundation model would have
seen them) in random sizes, strokes and offsets and takes one rectified-flow step
(:func:`flowdppo.tasks.pretraining.pretrain_flow_net`, shared with the shapes task).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from flowdppo.tasks.common import assets_dir
from flowdppo.tasks.pretraining import pretrain_flow_net
from flowdppo.tasks.text.model import BASE_WEIGHTS, SHIFT, TextVelocityNet
from flowdppo.tasks.text.rendering import word_batch
from flowdppo.tasks.text.words import ALL_WORDS, prompt_for, tokenize

#: Pretraining length of the shipped base model (see docs/text-task.md for its scores).
BASE_STEPS = 1000


def prompt_batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered words of both lists and their prompts."""
    images, words = word_batch(ALL_WORDS, n, rng)
    return images, [prompt_for(w) for w in words]


def pretrain_base_model(
    out_path: str | Path | None,
    seed: int = 0,
    steps: int = BASE_STEPS,
    *,
    batch_size: int = 32,
    lr: float = 2e-3,
    caption_dropout: float = 0.1,
    sigma_sampling: str = "logit_normal",
    ema_decay: float | None = 0.998,
    model_config: dict | None = None,
    threads: int = 1,
    verbose: bool = False,
) -> tuple[TextVelocityNet, dict]:
    """Train the velocity network on rendered words; write safetensors unless ``out_path``
    is None. Returns (network, metadata).

    One thread by default: on 2 cores a second thread bought little, and on a machine
    whose other core was busy it made each step twice as slow (0.82 s against 0.42 s);
    one thread also gives the same bytes whatever the machine's core count.
    """
    return pretrain_flow_net(
        TextVelocityNet,
        prompt_batch,
        tokenize,
        out_path,
        seed,
        steps,
        batch_size=batch_size,
        lr=lr,
        caption_dropout=caption_dropout,
        sigma_sampling=sigma_sampling,
        ema_decay=ema_decay,
        model_config=model_config,
        threads=threads,
        verbose=verbose,
        sigma_shift=SHIFT,
    )


def pretrain(out_dir: str | Path | None = None, seed: int = 0, verbose: bool = True) -> dict:
    """Re-create the text base model in ``out_dir`` (default: the package's assets folder).

    This is what ``flowdppo pretrain --task text`` runs.
    """
    out = (assets_dir() if out_dir is None else Path(out_dir)) / BASE_WEIGHTS
    start = time.perf_counter()
    if verbose:
        print(f"pretraining the text base model (seed {seed}) -> {out}", flush=True)
    _, meta = pretrain_base_model(out, seed=seed, verbose=verbose)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    if verbose:
        print(f"  done in {meta['seconds']} s: {meta}", flush=True)
    return {"base model": meta}
