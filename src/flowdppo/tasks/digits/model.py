"""The digits base model: a small class-conditional flow-matching velocity MLP and its adapter.

Rectified-flow path ``x_sigma = (1 - sigma) x0 + sigma eps`` with target velocity
``eps - x0``; sigma = 1 is pure noise. Label 10 is the null class for classifier-free guidance.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowdppo.models.base import Cond
from flowdppo.tasks.common import (
    AssetError,
    PixelFlowModel,
    assets_dir,
    load_module,
    sigma_embedding,
)
from flowdppo.tasks.digits.data import IMAGE_SHAPE, NULL_LABEL, NUM_CLASSES, prompts_to_labels

#: Names of the ``nn.Linear`` layers that suit LoRA (peft matches them as name suffixes):
#: the input projection, every block's conditioning modulation and MLP, and the output.
LORA_TARGETS: list[str] = ["inp", "ada", "fc1", "fc2", "out"]

BASE_WEIGHTS = "digits_base.safetensors"
CLASSIFIER_WEIGHTS = "digits_classifier.safetensors"


class DigitsAssetError(AssetError):
    """A missing or unreadable weights file of the digits task."""


class ResBlock(nn.Module):
    """Pre-norm residual MLP block with adaLN-style scale/shift from the condition."""

    def __init__(self, hidden: int, mlp_ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.ada = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, mlp_ratio * hidden)
        self.fc2 = nn.Linear(mlp_ratio * hidden, hidden)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada(c).chunk(2, dim=1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(F.silu(self.fc1(z)))


class DigitsVelocityNet(nn.Module):
    """``v(x, sigma, label)`` for 8x8 digits: an MLP over the 64 pixels.

    ``label`` is 0..9, or 10 (``NULL_LABEL``) for the unconditional velocity.
    """

    def __init__(self, hidden: int = 64, depth: int = 2, mlp_ratio: int = 2, emb_dim: int = 64):
        super().__init__()
        self.config = {"hidden": hidden, "depth": depth, "mlp_ratio": mlp_ratio, "emb_dim": emb_dim}
        pixels = math.prod(IMAGE_SHAPE)
        self.emb_dim = emb_dim
        self.time_fc = nn.Linear(emb_dim, hidden)
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, hidden)
        self.inp = nn.Linear(pixels, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out = nn.Linear(hidden, pixels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        c = F.silu(self.time_fc(sigma_embedding(sigma, self.emb_dim)) + self.label_emb(label))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        return self.out(F.silu(self.norm(h))).view_as(x)


class DigitsModel(PixelFlowModel):
    """The ``FlowModel`` adapter of the digits task (prompts "zero" ... "nine")."""

    image_shape = IMAGE_SHAPE
    cond_key = "label"

    def encode(self, prompts: list[str]) -> Cond:
        return {"label": prompts_to_labels(prompts)}

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, NULL_LABEL)


def load_base_model(path: str | Path | None = None) -> DigitsModel:
    """The digits base model from ``path``, or the shipped weights when ``path`` is None."""
    path = assets_dir() / BASE_WEIGHTS if path is None else Path(path)
    net, _ = load_module(DigitsVelocityNet, path, "digits base model", "digits", DigitsAssetError)
    return DigitsModel(net)
