"""The one interface the trainer needs from a generator.

A model adapter answers "velocity for these latents, noise levels and conditions" plus
prompt encoding, initial noise and decoding. Everything model-specific (guidance batching,
autocast, latent shapes) stays behind this interface so the trainer loop is shared.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

# A batch of conditions: a dict of tensors whose first dimension is the batch.
Cond = dict[str, torch.Tensor]


def index_cond(cond: Cond, index: torch.Tensor | slice) -> Cond:
    """Select rows of every tensor in a condition batch."""
    return {k: v[index] for k, v in cond.items()}


def cat_cond(conds: list[Cond]) -> Cond:
    """Concatenate condition batches along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class FlowModel(ABC):
    """A flow-matching generator seen by the trainer.

    ``module`` holds the trainable parameters (with LoRA: the peft-wrapped network).
    ``reference()`` is a context in which ``velocity`` answers as the frozen pre-trained
    model (with LoRA: adapters disabled; with full fine-tuning: a frozen copy).
    """

    module: nn.Module
    #: Time shift applied to the sigma schedule (SD3 uses 3.0).
    shift: float = 1.0
    #: Samples per model forward outside the update (rollout, reference KL, evaluation);
    #: None: the whole batch in one forward. See :meth:`batched_velocity`.
    forward_batch_size: int | None = None

    @abstractmethod
    def encode(self, prompts: list[str]) -> Cond:
        """Encode prompts into a condition batch (one row per prompt)."""

    @abstractmethod
    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``n`` starting latents at sigma = 1."""

    def latent_elements(self) -> int:
        """Elements of one sample's latent (d): what element-mean log-probs and KLs average
        over, and so the factor between a per-element and a per-step trust region."""
        return self.initial_noise(1, torch.Generator().manual_seed(0))[0].numel()

    @abstractmethod
    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Predict the velocity ``v = eps - x0`` at noise level ``sigma`` (shape [B])."""

    def batched_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """:meth:`velocity` in forwards of at most ``forward_batch_size`` samples.

        Only the network call is split; the caller draws the step's noise for the whole
        batch, so the random stream does not depend on the split. With guidance the network
        sees twice the rows (negative and positive). Every sample's velocity is computed
        from its own rows alone, so on the CPU the result is bit for bit the one-forward
        result when each chunk keeps the matrix kernel's row blocking (docs/cost.md,
        "Forward batch size").
        """
        n, b = self.forward_batch_size, x.shape[0]
        if n is None or b <= n:
            return self.velocity(x, sigma, cond, guidance_scale)
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        sigma = sigma.expand(b) if sigma.numel() == 1 else sigma
        parts = [
            self.velocity(
                x[s : s + n], sigma[s : s + n], index_cond(cond, slice(s, s + n)), guidance_scale
            )
            for s in range(0, b, n)
        ]
        return torch.cat(parts)

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Map final latents to images in [0, 1], shape [B, C, H, W]."""

    #: Frozen copy of the pre-trained network, used as the reference under full fine-tuning.
    #: With LoRA it stays ``None``: disabling the adapters gives the reference for free.
    frozen_reference: nn.Module | None = None

    def compile(self, backend: str = "inductor") -> None:
        """``torch.compile`` the network (and a frozen reference copy) in place.

        ``nn.Module.compile`` compiles the module's call and keeps the module itself, so
        parameter names, state dicts, LoRA adapters and ``reference()`` are unchanged (no
        ``_orig_mod.`` prefix). Disabling LoRA adapters for the reference is a change the
        compiled code guards on: it compiles the second variant once and keeps both.
        """
        self.module.compile(backend=backend)
        if self.frozen_reference is not None:
            self.frozen_reference.compile(backend=backend)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Answer as the frozen pre-trained model inside this context.

        ``velocity`` must read ``self.module`` at call time for this to work.
        """
        disable = getattr(self.module, "disable_adapter", None)
        if disable is not None:
            with disable():
                yield
            return
        if self.frozen_reference is None:
            raise RuntimeError(
                f"{type(self).__name__} has no reference model: enable LoRA or keep a frozen "
                "copy (the trainer does this when the reference KL or beta is used)"
            )
        trained, self.module = self.module, self.frozen_reference
        try:
            yield
        finally:
            self.module = trained
