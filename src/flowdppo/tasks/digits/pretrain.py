"""Seeded, reproducible pretraining of the digits base model and reward classifier (CPU, ~1 min).

Same seed, same torch build and thread count: bit-identical weights. Nothing here reads the
held-out split except to report a metric.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from flowdppo.tasks.common import assets_dir, cosine_lr, cpu_threads, save_module
from flowdppo.tasks.digits.data import NULL_LABEL, load_digits_split
from flowdppo.tasks.digits.model import (
    BASE_WEIGHTS,
    CLASSIFIER_WEIGHTS,
    DigitsVelocityNet,
)
from flowdppo.tasks.digits.rewards import DigitClassifier
from flowdppo.tasks.pretraining import timed_pretraining, train_loss

#: Pretraining length of the shipped base model. Deliberately modest: with 10 Euler steps
#: and no guidance its samples score ~0.5 under ``digit_prob``, which leaves RL headroom.
BASE_STEPS = 2000


def flow_matching_loss(
    net: DigitsVelocityNet,
    x0: torch.Tensor,
    label: torch.Tensor,
    generator: torch.Generator,
    label_dropout: float = 0.0,
) -> torch.Tensor:
    """Rectified-flow loss ``|v(x_sigma) - (eps - x0)|^2`` with sigma ~ U[0, 1]."""
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(n, generator=generator)
    drop = torch.rand(n, generator=generator) < label_dropout
    label = torch.where(drop, torch.full_like(label, NULL_LABEL), label)
    s = sigma.view(n, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    return F.mse_loss(net(x_sigma, sigma, label), eps - x0)


def pretrain_base_model(
    out_path: str | Path,
    seed: int = 0,
    steps: int = BASE_STEPS,
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    hidden: int = 64,
    depth: int = 2,
    mlp_ratio: int = 2,
    label_dropout: float = 0.1,
    threads: int = 2,
    verbose: bool = False,
) -> dict:
    """Train the class-conditional velocity net on the train split; write safetensors.

    Returns the metadata stored with the weights (seed, steps, hyper-parameters, final train
    loss and the flow-matching loss on the held-out split under fixed noise).
    """
    data = load_digits_split()
    with cpu_threads(threads):
        torch.manual_seed(seed)
        net = DigitsVelocityNet(hidden=hidden, depth=depth, mlp_ratio=mlp_ratio)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        n = len(data.y_train)
        losses: list[float] = []
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
            idx = torch.randint(n, (batch_size,), generator=gen)
            loss = flow_matching_loss(net, data.x_train[idx], data.y_train[idx], gen, label_dropout)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if verbose and (step + 1) % 500 == 0:
                print(f"  base step {step + 1}/{steps} loss {sum(losses[-500:]) / 500:.4f}")
        net.eval()
        with torch.no_grad():
            held = flow_matching_loss(
                net, data.x_heldout, data.y_heldout, torch.Generator().manual_seed(1234)
            )
    meta = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "label_dropout": label_dropout,
        "train_loss": train_loss(losses),
        "heldout_loss": round(held.item(), 5),
        "params": sum(p.numel() for p in net.parameters()),
    }
    save_module(net, out_path, meta)
    return meta


def _augment(x: torch.Tensor, generator: torch.Generator, noise: float) -> torch.Tensor:
    """Random shifts of up to one pixel (background fill) plus Gaussian pixel noise."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(3, (n,), generator=generator)
    dy = torch.randint(3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(n, 1, 8, 10)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(n, 1, 8, 8)
    shifted = shifted.gather(3, cols)
    return shifted + noise * torch.randn(shifted.shape, generator=generator)


def classifier_accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def pretrain_classifier(
    out_path: str | Path,
    seed: int = 0,
    epochs: int = 30,
    *,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise: float = 0.1,
    threads: int = 2,
    verbose: bool = False,
) -> dict:
    """Train the reward CNN on the (augmented) train split; write safetensors.

    Shifts and pixel noise make the reward less brittle on generated, slightly noisy
    samples. Returns the stored metadata, including the held-out accuracy.
    """
    data = load_digits_split()
    with cpu_threads(threads):
        torch.manual_seed(seed)
        net = DigitClassifier()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        n = len(data.y_train)
        steps = epochs * math.ceil(n / batch_size)
        step = 0
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, steps, lr, warmup=50)
                x = _augment(data.x_train[idx], gen, noise)
                loss = F.cross_entropy(net(x), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            if verbose and (epoch + 1) % 10 == 0:
                acc = classifier_accuracy(net.eval(), data.x_heldout, data.y_heldout)
                net.train()
                print(f"  classifier epoch {epoch + 1}/{epochs} held-out accuracy {acc:.4f}")
        net.eval()
        meta = {
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "noise": noise,
            "train_accuracy": round(classifier_accuracy(net, data.x_train, data.y_train), 5),
            "heldout_accuracy": round(classifier_accuracy(net, data.x_heldout, data.y_heldout), 5),
            "params": sum(p.numel() for p in net.parameters()),
        }
    save_module(net, out_path, meta)
    return meta


def pretrain(out_dir: str | Path | None = None, seed: int = 0, verbose: bool = True) -> dict:
    """Re-create both digits assets in ``out_dir`` (default: the package's assets folder).

    This is what ``flowdppo pretrain --task digits`` runs.
    """
    out = assets_dir() if out_dir is None else Path(out_dir)
    results = {
        name: timed_pretraining(f"digits {name}", fn, out / file, seed, verbose)
        for name, fn, file in (
            ("classifier", pretrain_classifier, CLASSIFIER_WEIGHTS),
            ("base model", pretrain_base_model, BASE_WEIGHTS),
        )
    }
    # A new classifier file must not be shadowed by one cached in this process.
    from flowdppo.tasks.digits import rewards

    rewards._CLASSIFIERS.clear()
    return results
