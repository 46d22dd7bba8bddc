"""An exponential moving average (EMA) of the trained weights (``train.ema``).

After every ``every``-th optimizer step each trainable tensor's average moves towards it:
``ema <- decay * ema + (1 - decay) * weight``. The average starts at the initial weights
(with LoRA: adapters that change nothing), is kept in float32 whatever the model's dtype
(a bfloat16 average would lose updates of 1 - decay = 0.001), is saved in every
checkpoint and restored on resume, so a resumed run averages exactly as an uninterrupted
one. Evaluation, ``flowdppo sample``, ``eval`` and ``export-lora`` use it when it is on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from flowdppo.trainer.sharding import copy_full


class WeightAverage:
    def __init__(self, module: nn.Module, decay: float, every: int):
        self.decay, self.every = decay, every
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.average = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, optimizer_steps: int) -> None:
        """Called after each optimizer step with the number of steps taken so far."""
        if optimizer_steps % self.every:
            return
        for name, p in self.params.items():
            self.average[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.average):
            raise ValueError("the checkpoint's EMA tensors do not match the trainable ones")
        for name, value in state.items():
            copy_full(self.average[name], value)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the model holds the averaged weights; after: exactly its own again."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])
