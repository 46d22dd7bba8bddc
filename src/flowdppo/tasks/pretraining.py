"""Seeded, reproducible pretraining of a caption-conditioned task network (shapes, text).

A task states how its shipped base model was made as a :class:`PretrainRecipe` (network,
data, tokenizer, hyper-parameters); ``recipe.train`` runs :func:`pretrain_flow_net` with
them, and ``recipe.pretrain`` re-creates the shipped file (``flowdppo pretrain --task``).

Every step draws a fresh batch of rendered images with their captions from the task's
``batch(n, rng)`` and takes one rectified-flow step; captions are dropped to the null
caption with probability ``caption_dropout`` for classifier-free guidance. An exponential
moving average of the weights is what gets saved. Same seed, same torch build and thread
count: bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowdppo.schedule import shift_sigmas
from flowdppo.tasks.common import assets_dir, cosine_lr, cpu_threads, save_module

#: ``batch(n, rng) -> (images [n, C, H, W] in [-1, 1], captions)``.
BatchFn = Callable[[int, np.random.Generator], tuple[torch.Tensor, list[str]]]
#: ``tokenize(captions, null=[bool, ...]) -> rows of token ids``.
TokenizeFn = Callable[..., list[list[int]]]


def flow_matching_loss(
    net: nn.Module,
    x0: torch.Tensor,
    captions: list[str],
    tokenize: TokenizeFn,
    generator: torch.Generator,
    caption_dropout: float = 0.0,
    sigma_sampling: str = "uniform",
    sigma_shift: float = 1.0,
) -> torch.Tensor:
    """Rectified-flow loss ``|v(x_sigma) - (eps - x0)|^2``.

    ``sigma_sampling``: ``uniform`` on [0, 1], or ``logit_normal`` (sigmoid of a standard
    normal, SD3's choice: it spends the steps on the middle noise levels, where the layout is
    decided, rather than on the ends, where the loss is mostly irreducible noise).
    ``sigma_shift``: the drawn sigma is time-shifted, ``s sigma / (1 + (s - 1) sigma)``, as
    SD3 shifts its schedule for larger images, where more noise is needed to hide the
    layout; the model's sampler uses the same shift.
    """
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator)
    if sigma_sampling == "logit_normal":
        sigma = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        sigma = torch.rand(n, generator=generator)
    if sigma_shift != 1.0:
        sigma = shift_sigmas(sigma, sigma_shift)
    drop = (torch.rand(n, generator=generator) < caption_dropout).tolist()
    tokens = torch.tensor(tokenize(captions, null=drop), dtype=torch.long)
    s = sigma.view(n, *([1] * (x0.dim() - 1)))
    x_sigma = (1 - s) * x0 + s * eps
    return F.mse_loss(net(x_sigma, sigma, tokens), eps - x0)


def pretrain_flow_net(
    net_cls: Callable[..., nn.Module],
    batch: BatchFn,
    tokenize: TokenizeFn,
    out_path: str | Path | None,
    seed: int,
    steps: int,
    *,
    batch_size: int,
    lr: float,
    caption_dropout: float,
    sigma_sampling: str,
    ema_decay: float | None,
    model_config: dict | None,
    threads: int,
    verbose: bool,
    warmup: int = 100,
    sigma_shift: float = 1.0,
) -> tuple[nn.Module, dict]:
    """Train ``net_cls(**model_config)``; write safetensors unless ``out_path`` is None.

    Returns (network, metadata): seed, steps, hyper-parameters, final train loss and the loss
    on a fixed validation batch (512 images from ``batch`` with seed 10,000 + seed) under
    fixed noise.
    """
    start = time.perf_counter()
    with cpu_threads(threads):
        torch.manual_seed(seed)
        net = net_cls(**(model_config or {}))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        # Over a short, noisy run the average gives markedly cleaner samples than the last
        # iterate.
        ema = [p.detach().clone() for p in net.parameters()] if ema_decay else None
        losses: list[float] = []
        log_every = max(1, steps // 10)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr, warmup=min(warmup, steps // 10 + 1))
            x0, captions = batch(batch_size, rng)
            loss = flow_matching_loss(
                net, x0, captions, tokenize, gen, caption_dropout, sigma_sampling, sigma_shift
            )
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
            x0, captions = batch(512, np.random.default_rng(10_000 + seed))
            val = flow_matching_loss(
                net,
                x0,
                captions,
                tokenize,
                torch.Generator().manual_seed(1234),
                sigma_shift=sigma_shift,
            )
    meta = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "caption_dropout": caption_dropout,
        "sigma_sampling": sigma_sampling,
        **({"sigma_shift": sigma_shift} if sigma_shift != 1.0 else {}),
        "ema_decay": ema_decay,
        "train_loss": train_loss(losses),
        "val_loss": round(val.item(), 5),
        "params": sum(p.numel() for p in net.parameters()),
    }
    if out_path is not None:
        save_module(net, out_path, meta)
    return net, meta


@dataclass(frozen=True)
class PretrainRecipe:
    """How a task's base model is pretrained, and where its shipped weights live."""

    task: str
    net_cls: Callable[..., nn.Module]
    batch: BatchFn
    tokenize: TokenizeFn
    #: File name of the shipped weights in the package's assets folder.
    weights: str
    steps: int
    batch_size: int
    threads: int
    lr: float = 2e-3
    caption_dropout: float = 0.1
    sigma_sampling: str = "logit_normal"
    ema_decay: float | None = 0.998
    #: The time shift of the drawn sigma; the task's sampler uses the same.
    sigma_shift: float = 1.0

    def train(
        self,
        out_path: str | Path | None,
        seed: int = 0,
        steps: int | None = None,
        *,
        model_config: dict | None = None,
        verbose: bool = False,
        **overrides,
    ) -> tuple[nn.Module, dict]:
        """Train the network on the task's batches; write safetensors unless ``out_path`` is
        None. ``overrides`` replace the recipe's hyper-parameters (``batch_size``, ``lr``,
        ``caption_dropout``, ``sigma_sampling``, ``ema_decay``, ``threads``). Returns
        (network, metadata), see :func:`pretrain_flow_net`.
        """
        r = dataclasses.replace(self, **overrides)
        return pretrain_flow_net(
            r.net_cls,
            r.batch,
            r.tokenize,
            out_path,
            seed,
            r.steps if steps is None else steps,
            batch_size=r.batch_size,
            lr=r.lr,
            caption_dropout=r.caption_dropout,
            sigma_sampling=r.sigma_sampling,
            ema_decay=r.ema_decay,
            model_config=model_config,
            threads=r.threads,
            verbose=verbose,
            sigma_shift=r.sigma_shift,
        )

    def pretrain(
        self, out_dir: str | Path | None = None, seed: int = 0, verbose: bool = True
    ) -> dict:
        """Re-create the base model in ``out_dir`` (default: the package's assets folder).

        This is what ``flowdppo pretrain --task TASK`` runs.
        """
        out = (assets_dir() if out_dir is None else Path(out_dir)) / self.weights
        meta = timed_pretraining(
            f"{self.task} base model", lambda *a, **kw: self.train(*a, **kw)[1], out, seed, verbose
        )
        return {"base model": meta}


def timed_pretraining(
    what: str, train: Callable[..., dict], path: Path, seed: int, verbose: bool
) -> dict:
    """``train(path, seed=seed, verbose=verbose)``, its metadata plus the ``seconds`` it took."""
    start = time.perf_counter()
    if verbose:
        print(f"pretraining the {what} (seed {seed}) -> {path}", flush=True)
    meta = train(path, seed=seed, verbose=verbose)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    if verbose:
        print(f"  done in {meta['seconds']} s: {meta}", flush=True)
    return meta


def train_loss(losses: list[float]) -> float:
    """The metadata's ``train_loss``: the mean loss of the last 100 steps."""
    tail = losses[-min(100, len(losses)) :]
    return round(sum(tail) / len(tail), 5)
