"""The text base model: a character encoder plus a small patch transformer on 32 x 128 pixels.

* letters: letter embeddings + two learned positions per letter (its index, and its offset
  from the word's centre in half-letters, which is where a centred word puts it) -> one
  pre-norm transformer layer -> per-letter features and their mean (pooled);
* image: one grey channel in [-1, 1] (d = 4,096), a full-resolution 3x3 convolution, then
  ``patch`` = (rows, columns) patches as tokens with learned 2D positions;
* blocks: the shapes task's adaLN-zero blocks (self-attention, cross-attention to the
  letters, MLP), conditioned on sigma and the pooled word;
* output: the clean image (x-prediction), turned into a velocity ``(x - x0) / sigma``.

Rectified flow as in the other tasks: ``x_sigma = (1 - sigma) x0 + sigma eps``; the null
word gives the unconditional velocity for classifier-free guidance.
"""

from __future__ import annotations

from functools import lru_cache
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
from flowdppo.tasks.shapes.model import SIGMA_FLOOR, Block, TextBlock
from flowdppo.tasks.text.rendering import HEIGHT, WIDTH, render
from flowdppo.tasks.text.words import ALPHABET, MAX_CHARS, NULL_ID, PAD_ID, VOCAB_SIZE, tokenize

LORA_TARGETS: list[str] = ["qkv", "q", "kv", "proj", "fc1", "fc2", "ada", "out"]
BASE_WEIGHTS = "text_base.safetensors"
IMAGE_SHAPE = (1, HEIGHT, WIDTH)
SHIFT = 3.0


class TextAssetError(AssetError):
    """A missing or unreadable weights file of the text task."""


class CharEncoder(nn.Module):
    """Letter ids [B, MAX_CHARS] -> (letter features [B, L, D], pooled [B, D], key bias)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(MAX_CHARS, dim))
        self.offset = nn.Parameter(0.02 * torch.randn(2 * MAX_CHARS - 1, dim))
        self.blocks = nn.ModuleList(TextBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real = tokens != PAD_ID
        length = real.sum(1, keepdim=True)
        index = torch.arange(tokens.shape[1], device=tokens.device)[None]
        # Offset of letter k from the centre of a word of `length` letters, in half-letters.
        offset = (2 * index - (length - 1)).clamp(-(MAX_CHARS - 1), MAX_CHARS - 1)
        t = self.embed(tokens) + self.pos[: tokens.shape[1]] + self.offset[offset + MAX_CHARS - 1]
        bias = torch.zeros(real.shape, device=tokens.device).masked_fill(~real, float("-inf"))
        bias = bias[:, None, None, :]
        for block in self.blocks:
            t = block(t, bias)
        t = self.norm(t)
        weights = real.float()[..., None]
        pooled = (t * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return t, pooled, bias


class TextVelocityNet(nn.Module):
    """``v(x, sigma, tokens)`` for 1 x 32 x 128 word images conditioned on the word's letters."""

    def __init__(
        self,
        dim: int = 96,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: int = 2,
        text_dim: int = 64,
        text_depth: int = 1,
        patch: tuple[int, int] | list[int] = (8, 4),
        emb_dim: int = 64,
        conv: int = 8,
        glyph: bool = True,
        residual: bool = True,
    ):
        super().__init__()
        ph, pw = patch
        self.config = {
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "text_dim": text_dim,
            "text_depth": text_depth,
            "patch": [ph, pw],
            "emb_dim": emb_dim,
            "conv": conv,
            "glyph": glyph,
            "residual": residual,
        }
        if residual and not glyph:
            raise ValueError("residual=True predicts the glyph image plus a correction: set glyph")
        self.residual = residual
        if HEIGHT % ph or WIDTH % pw:
            raise ValueError(f"patch {ph}x{pw} does not divide the image size {HEIGHT}x{WIDTH}")
        self.ph, self.pw, self.emb_dim, self.conv = ph, pw, emb_dim, conv
        self.rows, self.cols = HEIGHT // ph, WIDTH // pw
        self.text = CharEncoder(text_dim, text_depth, heads, mlp_ratio)
        self.time_fc = nn.Linear(emb_dim, dim)
        self.text_fc = nn.Linear(text_dim, dim)
        self.glyph = glyph
        inputs = 2 if glyph else 1
        pix = conv if conv else inputs
        if conv:
            self.stem = nn.Conv2d(inputs, conv, 3, padding=1)
            self.head1 = nn.Conv2d(2 * conv + 1, conv, 3, padding=1)
            self.head2 = nn.Conv2d(conv, 1, 3, padding=1)
        self.inp = nn.Linear(pix * ph * pw, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(self.rows * self.cols, dim))
        self.blocks = nn.ModuleList(Block(dim, text_dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out_ada = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, pix * ph * pw)
        last = [self.head2] if conv else [self.out]
        for layer in [b.ada for b in self.blocks] + [self.out_ada] + last:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, ph, pw, r, c = x.shape[0], self.ph, self.pw, self.rows, self.cols
        text, pooled, bias = self.text(tokens)
        cond = F.silu(self.time_fc(sigma_embedding(sigma, self.emb_dim)) + self.text_fc(pooled))
        g = glyphs(tokens).to(x) if self.glyph else None
        inp = torch.cat([x, g], dim=1) if self.glyph else x
        f0 = F.gelu(self.stem(inp)) if self.conv else inp
        ch = f0.shape[1]
        h = f0.reshape(b, ch, r, ph, c, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, r * c, -1)
        h = self.inp(h) + self.pos
        for block in self.blocks:
            h = block(h, cond, text, bias)
        scale, shift = self.out_ada(cond)[:, None].chunk(2, dim=-1)
        h = self.out(self.norm(h) * (1 + scale) + shift)
        h = h.reshape(b, r, c, ch, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(f0.shape)
        if not self.conv:
            h = h[:, :1]
        else:
            h = self.head2(F.gelu(self.head1(torch.cat([h, f0, x], dim=1))))
        if self.residual:
            h = h + g
        # x-prediction, as the shapes model: v = (x - x0) / sigma, sigma floored.
        s = sigma.float().clamp_min(SIGMA_FLOOR).view(-1, 1, 1, 1)
        return (x - h) / s


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


class TextModel(PixelFlowModel):
    """The ``FlowModel`` adapter of the text task (prompts of :mod:`.words`)."""

    image_shape = IMAGE_SHAPE
    cond_key = "tokens"
    #: The sampler's time shift, SD3's 3 (pretraining draws sigma with the same shift): at
    #: 4,096 pixels a word is still legible at sigma = 0.8 of an unshifted schedule, so the
    #: steps belong at the high noise levels, where the layout is decided.
    shift = SHIFT

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(cond, PAD_ID)
        null[:, 0] = NULL_ID
        return null

    def encode(self, prompts: list[str]) -> Cond:
        return {"tokens": torch.tensor(tokenize(prompts), dtype=torch.long)}


def load_base_model(path: str | Path | None = None) -> TextModel:
    """The text base model from ``path``, or the shipped weights when ``path`` is None."""
    path = assets_dir() / BASE_WEIGHTS if path is None else Path(path)
    net, _ = load_module(TextVelocityNet, path, "text base model", "text", TextAssetError)
    return TextModel(net)
