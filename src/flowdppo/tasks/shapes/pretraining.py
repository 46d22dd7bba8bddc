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

import numpy as np
import torch
import torch.nn.functional as F

from flowdppo.tasks.common import assets_dir, cosine_lr, cpu_threads, save_module
from flowdppo.tasks.shapes.grammar import tokenize
from flowdppo.tasks.shapes.model import BASE_WEIGHTS, ShapesVelocityNet
from flowdppo.tasks.shapes.scenes import scene_batch

#: Pretraining length of the shipped base model: about 5 minutes on 2 CPU cores. A small
#: model trained this briefly and sampled with 10 Euler steps is imperfect on binding,
#: counting and position, which leaves RL its headroom (see docs/shapes-task.md).
BASE_STEPS = 4000


def flow_matching_loss(
    net: ShapesVelocityNet,
    x0: torch.Tensor,
    captions: list[str],
    generator: torch.Generator,
    caption_dropout: float = 0.0,
    sigma_sampling: str = "uniform",
) -> torch.Tensor:
    """Rectified-flow loss ``|v(x_sigma) - (eps - x0)|^2``.

    ``sigma_sampling``: ``uniform`` on [0, 1], or ``logit_normal`` (sigmoid of a standard
    normal, SD3's choice: it spends the steps on the middle noise levels, where the layout is
    decided, rather than on the ends, where the loss is mostly irreducible noise).
    """
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator)
    if sigma_sampling == "logit_normal":
        sigma = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        sigma = torch.rand(n, generator=generator)
    drop = (torch.rand(n, generator=generator) < caption_dropout).tolist()
    tokens = torch.tensor(tokenize(captions, null=drop), dtype=torch.long)
    s = sigma.view(n, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    return F.mse_loss(net(x_sigma, sigma, tokens), eps - x0)


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
    is None. Returns (network, metadata): seed, steps, hyper-parameters, final train loss
    and the loss on a fixed validation batch under fixed noise.
    """
    start = time.perf_counter()
    with cpu_threads(threads):
        torch.manual_seed(seed)
        net = ShapesVelocityNet(**(model_config or {}))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        # An exponential moving average of the weights is what gets saved: over a short,
        # noisy run it gives markedly cleaner samples than the last iterate.
        ema = [p.detach().clone() for p in net.parameters()] if ema_decay else None
        losses: list[float] = []
        log_every = max(1, steps // 10)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
            x0, captions = scene_batch(batch_size, rng)
            loss = flow_matching_loss(net, x0, captions, gen, caption_dropout, sigma_sampling)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if ema is not None:
                # Warm up the average so that early, random weights fade fast.
                decay = min(ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - decay)
            losses.append(loss.item())
            if verbose and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                print(
                    f"  step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
        if ema is not None:
            with torch.no_grad():
                for p, e in zip(net.parameters(), ema):
                    p.copy_(e)
        net.eval()
        with torch.no_grad():
            x0, captions = scene_batch(512, np.random.default_rng(10_000 + seed))
            val = flow_matching_loss(net, x0, captions, torch.Generator().manual_seed(1234))
    tail = losses[-min(100, len(losses)) :]
    meta = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "caption_dropout": caption_dropout,
        "sigma_sampling": sigma_sampling,
        "ema_decay": ema_decay,
        "train_loss": round(sum(tail) / len(tail), 5),
        "val_loss": round(val.item(), 5),
        "params": sum(p.numel() for p in net.parameters()),
    }
    if out_path is not None:
        save_module(net, out_path, meta)
    return net, meta


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
