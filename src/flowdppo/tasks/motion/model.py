"""The motion base model: the shared conditioned flow transformer (:mod:`flowdppo.tasks.blocks`)
on clips of 8 frames of 24x24 RGB, conditioned on a caption of :mod:`.grammar`.

* text: word embeddings + positions -> 1 pre-norm transformer layer -> per-token features
  and their mean over real tokens (pooled);
* clip: [3, 8, 24, 24] in [-1, 1], a per-frame 1x3x3 convolution, then spatio-temporal
  patches of 2 frames x 6 x 6 pixels (4 x 4 x 4 = 64 tokens) + learned positions;
* blocks: adaLN-zero around self-attention over all 64 tokens (space and time at once: that
  is where a trajectory is drawn), cross-attention to the caption tokens and an MLP;
* output: the clean clip (x-prediction), turned into a velocity ``(x - x0) / sigma``.
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
from flowdppo.tasks.motion.clips import CLIP_SHAPE
from flowdppo.tasks.motion.grammar import MAX_TOKENS, NULL_ID, PAD_ID, VOCAB, tokenize

BASE_WEIGHTS = "motion_base.safetensors"
#: The time shift of the sampler and of pretraining's sigma (see docs/motion-task.md).
SHIFT = 3.0


class MotionAssetError(AssetError):
    """A missing or unreadable weights file of the motion task."""


class MotionVelocityNet(FlowTransformer):
    """``v(x, sigma, tokens)`` for clips [B, 3, 8, 24, 24] conditioned on a tokenised caption.

    ``patch`` and ``kernel`` are (frames, rows, columns); ``trunk``: the transformer's size
    (:data:`~flowdppo.tasks.blocks.TRUNK_DEFAULTS`).
    """

    def __init__(
        self,
        patch: tuple[int, int, int] = (2, 6, 6),
        kernel: tuple[int, int, int] = (1, 3, 3),
        emb_dim: int = 64,
        conv: int = 8,
        **trunk: int,
    ):
        patch, kernel = tuple(patch), tuple(kernel)
        config = trunk_config(
            trunk, patch=list(patch), kernel=list(kernel), emb_dim=emb_dim, conv=conv
        )
        super().__init__(
            partial(TokenEncoder, len(VOCAB), MAX_TOKENS, pad_id=PAD_ID),
            config,
            size=CLIP_SHAPE[1:],
            patch=patch,
            channels=3,
            in_channels=3,
            kernel=kernel,
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return x0_to_velocity(x, self.trunk(x, x, sigma, tokens), sigma)


class MotionModel(TokenFlowModel):
    """The ``FlowModel`` adapter of the motion task: latents are the clips themselves,
    [B, 3, F, H, W] in [-1, 1], decoded to [0, 1] (the video layout of the trainer's grids)."""

    image_shape = CLIP_SHAPE
    shift = SHIFT
    tokenize = staticmethod(tokenize)
    pad_id, null_id = PAD_ID, NULL_ID


def load_base_model(path: str | Path | None = None) -> MotionModel:
    """The motion base model from ``path``, or the shipped weights when ``path`` is None."""
    where = Path(path) if path is not None else assets_dir() / BASE_WEIGHTS
    return MotionModel(
        load_module(MotionVelocityNet, where, "motion base model", "motion", MotionAssetError)[0]
    )
