"""Seeded, reproducible pretraining of the shapes base model (CPU, about 5 minutes on 2 cores).

Every step renders a fresh batch of random scenes with their captions (skills drawn
uniformly, captions from the full grammar: both splits, as a foundation model would have
seen them) and takes one rectified-flow step; captions are dropped to the null caption with
probability 0.1 for classifier-free guidance. Same seed, same torch build and thread count:
bit-identical weights.
"""

from __future__ import annotations

import time
from pathlib import Path

from flowdppo.tasks.common import assets_dir
from flowdppo.tasks.pretraining import pretrain_flow_net
from flowdppo.tasks.shapes.grammar import tokenize
from flowdppo.tasks.shapes.model import BASE_WEIGHTS, ShapesVelocityNet
from flowdppo.tasks.shapes.scenes import scene_batch

#: Pretraining length of the shipped base model: about 5 minutes on 2 CPU cores. A small
#: model trained this briefly and sampled with 10 Euler steps is imperfect on binding,
#: counting and position, which leaves RL its headroom (see docs/shapes-task.md).
BASE_STEPS = 4000


def pretrain_base_model(
    out_path: str | Path | None,
    seed: int = 0,
    steps: int = BASE_STEPS,
    *,
    batch_size: int = 64,
    lr: float = 2e-3,
    caption_dropout: float = 0.1,
    sigma_sampling: str = "logit_normal",
    ema_decay: float | None = 0.998,
    model_config: dict | None = None,
    threads: int = 2,
    verbose: bool = False,
) -> tuple[ShapesVelocityNet, dict]:
    """Train the velocity network on rendered scenes; write safetensors unless ``out_path``
    is None. Returns (network, metadata), see :func:`~flowdppo.tasks.pretraining.pretrain_flow_net`.
    """
    return pretrain_flow_net(
        ShapesVelocityNet,
        scene_batch,
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
    )


def pretrain(out_dir: str | Path | None = None, seed: int = 0, verbose: bool = True) -> dict:
    """Re-create the shapes base model in ``out_dir`` (default: the package's assets folder).

    This is what ``flowdppo pretrain --task shapes`` runs.
    """
    out = (assets_dir() if out_dir is None else Path(out_dir)) / BASE_WEIGHTS
    start = time.perf_counter()
    if verbose:
        print(f"pretraining the shapes base model (seed {seed}) -> {out}", flush=True)
    _, meta = pretrain_base_model(out, seed=seed, verbose=verbose)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    if verbose:
        print(f"  done in {meta['seconds']} s: {meta}", flush=True)
    return {"base model": meta}
