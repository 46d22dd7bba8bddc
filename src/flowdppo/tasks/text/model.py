"""The text base model: a character encoder plus a small patch transformer on 32 x 128 pixels.

* letters: letter embeddings + two learned positions per letter (its index, and its offset
  from the word's centre in half-letters, which is where a centred word puts it) -> one
  pre-norm transformer layer -> per-letter features and their mean (pooled);
* image: one grey channel in [-1, 1] (d = 4,096), a full-resolution 3x3 convolution, then
  ``patch`` = (rows, columns) patches as tokens with learned 2D positions;
* blocks: the shared adaLN-zero blocks of :mod:`flowdppo.tasks.blocks` (self-attention,
  cross-attention to the letters, MLP), conditioned on sigma and the pooled word;
* output: the clean image (x-prediction), turned into a velocity ``(x - x0) / sigma``.

Rectified flow as in the other tasks: ``x_sigma = (1 - sigma) x0 + sigma eps``; the null
word gives the unconditional velocity for classifier-free guidance.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from flowdppo.tasks.blocks import (
    FlowTransformer,
    TokenEncoder,
    TokenFlowModel,
    trunk_config,
    x0_to_velocity,
)
from flowdppo.tasks.common import AssetError, assets_dir, load_module
from flowdppo.tasks.text.rendering import HEIGHT, WIDTH, render
from flowdppo.tasks.text.words import ALPHABET, MAX_CHARS, NULL_ID, PAD_ID, VOCAB_SIZE, tokenize

BASE_WEIGHTS = "text_base.safetensors"
IMAGE_SHAPE = (1, HEIGHT, WIDTH)
SHIFT = 3.0


class TextAssetError(AssetError):
    """A missing or unreadable weights file of the text task."""


class CharEncoder(TokenEncoder):
    """Letter ids [B, MAX_CHARS] -> (letter features [B, L, D], pooled [B, D], key bias).

    Besides its index, each letter gets a learned embedding of its offset from the centre
    of the word, in half-letters: where a centred word puts it.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: int):
        super().__init__(
            VOCAB_SIZE,
            MAX_CHARS,
            dim,
            depth,
            heads,
            mlp_ratio,
            pad_id=PAD_ID,
            random_positions=True,
        )

    def add_embeddings(self, max_len: int, dim: int) -> None:
        self.offset = nn.Parameter(0.02 * torch.randn(2 * max_len - 1, dim))

    def embeddings(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        length = real.sum(1, keepdim=True)
        index = torch.arange(tokens.shape[1], device=tokens.device)[None]
        # Offset of letter k from the centre of a word of `length` letters, in half-letters.
        offset = (2 * index - (length - 1)).clamp(-(MAX_CHARS - 1), MAX_CHARS - 1)
        return super().embeddings(tokens, real) + self.offset[offset + MAX_CHARS - 1]


class TextVelocityNet(FlowTransformer):
    """``v(x, sigma, tokens)`` for 1 x 32 x 128 word images conditioned on the word's letters.

    With ``glyph``, the word rendered in the canonical style is a second input channel;
    with ``residual`` as well, the network predicts a correction to that glyph image.
    ``trunk``: the transformer's size (:data:`~flowdppo.tasks.blocks.TRUNK_DEFAULTS`).
    """

    def __init__(
        self,
        patch: tuple[int, int] | list[int] = (8, 4),
        emb_dim: int = 64,
        conv: int = 8,
        glyph: bool = True,
        residual: bool = True,
        **trunk: int,
    ):
        ph, pw = patch
        config = trunk_config(
            trunk, patch=[ph, pw], emb_dim=emb_dim, conv=conv, glyph=glyph, residual=residual
        )
        if residual and not glyph:
            raise ValueError("residual=True predicts the glyph image plus a correction: set glyph")
        super().__init__(
            CharEncoder,
            config,
            size=(HEIGHT, WIDTH),
            patch=(ph, pw),
            channels=1,
            in_channels=2 if glyph else 1,
        )
        self.glyph, self.residual = glyph, residual

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        g = glyphs(tokens).to(x) if self.glyph else None
        h = self.trunk(x, torch.cat([x, g], dim=1) if self.glyph else x, sigma, tokens)
        if self.residual:
            h = h + g
        return x0_to_velocity(x, h, sigma)


@lru_cache(maxsize=4096)
def _glyph(ids: tuple[int, ...]) -> torch.Tensor:
    real = [i for i in ids if i != PAD_ID]
    if real[:1] == [NULL_ID] or not real:
        return torch.zeros(1, HEIGHT, WIDTH)
    word = "".join(ALPHABET[i - 2] for i in real)
    return torch.from_numpy(render(word))[None] * 2 - 1


def glyphs(tokens: torch.Tensor) -> torch.Tensor:
    """The glyph image of every row's word [B, 1, H, W] in [-1, 1]: the word in the canonical
    style (size 18, no stroke, centred); zeros for the null word."""
    return torch.stack([_glyph(tuple(row)) for row in tokens.tolist()])


class TextModel(TokenFlowModel):
    """The ``FlowModel`` adapter of the text task (prompts of :mod:`.words`)."""

    image_shape = IMAGE_SHAPE
    tokenize = staticmethod(tokenize)
    pad_id, null_id = PAD_ID, NULL_ID
    #: The sampler's time shift, SD3's 3 (pretraining draws sigma with the same shift): at
    #: 4,096 pixels a word is still legible at sigma = 0.8 of an unshifted schedule, so the
    #: steps belong at the high noise levels, where the layout is decided.
    shift = SHIFT


def load_base_model(path: str | Path | None = None) -> TextModel:
    """The text base model from ``path``, or the shipped weights when ``path`` is None."""
    path = assets_dir() / BASE_WEIGHTS if path is None else Path(path)
    net, _ = load_module(TextVelocityNet, path, "text base model", "text", TextAssetError)
    return TextModel(net)
