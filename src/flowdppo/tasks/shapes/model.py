"""The shapes base model: the shared conditioned flow transformer (:mod:`flowdppo.tasks.blocks`)
on 16x16 RGB scenes, conditioned on a caption of :mod:`.grammar`.

* text: word embeddings + positions (from zero) -> 1 pre-norm transformer layer -> per-token
  features and their mean over real tokens (pooled);
* image: 16x16x3 in [-1, 1], a full-resolution 3x3 convolution, then 4x4 patches (16
  tokens) + learned 2D positions;
* blocks: adaLN-zero (scale, shift, gate from sigma and the pooled caption) around
  self-attention, cross-attention to the caption tokens (where binding is learned), and an MLP;
* output: the clean image (x-prediction), turned into a velocity ``(x - x0) / sigma``; or
  the velocity itself with ``prediction="velocity"``.

Rectified flow: ``x_sigma = (1 - sigma) x0 + sigma eps``, target velocity ``eps - x0``. The
null caption (``<null>``) gives the unconditional velocity for classifier-free guidance.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from flowdppo.tasks.blocks import (
    FlowTransformer,
    TokenEncoder,
    TokenFlowModel,
    trunk_config,
    x0_to_velocity,
)
from flowdppo.tasks.common import AssetError, assets_dir, load_module
from flowdppo.tasks.shapes.grammar import MAX_TOKENS, NULL_ID, PAD_ID, VOCAB, tokenize
from flowdppo.tasks.shapes.scenes import IMAGE_SIZE

BASE_WEIGHTS = "shapes_base.safetensors"
IMAGE_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)


class ShapesAssetError(AssetError):
    """A missing or unreadable weights file of the shapes task."""


class ShapesVelocityNet(FlowTransformer):
    """``v(x, sigma, tokens)`` for 16x16 RGB scenes conditioned on a tokenised caption.

    ``trunk``: the transformer's size (:data:`~flowdppo.tasks.blocks.TRUNK_DEFAULTS`).
    """

    def __init__(
        self,
        patch: int = 4,
        emb_dim: int = 64,
        conv: int = 16,
        prediction: str = "x0",
        **trunk: int,
    ):
        config = trunk_config(trunk, patch=patch, emb_dim=emb_dim, conv=conv, prediction=prediction)
        if prediction not in ("x0", "velocity"):
            raise ValueError(f"prediction must be 'x0' or 'velocity', got {prediction!r}")
        super().__init__(
            partial(TokenEncoder, len(VOCAB), MAX_TOKENS, pad_id=PAD_ID),
            config,
            size=(IMAGE_SIZE, IMAGE_SIZE),
            patch=(patch, patch),
            channels=3,
            in_channels=3,
        )
        self.prediction = prediction

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x, x, sigma, tokens)
        return h if self.prediction == "velocity" else x0_to_velocity(x, h, sigma)


class ShapesModel(TokenFlowModel):
    """The ``FlowModel`` adapter of the shapes task (captions of :mod:`.grammar`)."""

    image_shape = IMAGE_SHAPE
    tokenize = staticmethod(tokenize)
    pad_id, null_id = PAD_ID, NULL_ID


def load_base_model(path: str | Path | None = None) -> ShapesModel:
    """The shapes base model from ``path``, or the shipped weights when ``path`` is None."""
    path = assets_dir() / BASE_WEIGHTS if path is None else Path(path)
    net, _ = load_module(ShapesVelocityNet, path, "shapes base model", "shapes", ShapesAssetError)
    return ShapesModel(net)
