"""The shapes base model: a caption encoder plus a small patch transformer velocity network.

* text: word embeddings + learned positions -> 2 pre-norm transformer layers -> per-token
  features and their mean over real tokens (pooled);
* image: 16x16x3 in [-1, 1] cut into 4x4 patches (16 tokens) + learned 2D positions;
* blocks: adaLN-zero (scale, shift, gate from sigma and the pooled caption) around
  self-attention, cross-attention to the caption tokens (where binding is learned), and an MLP.

Rectified flow: ``x_sigma = (1 - sigma) x0 + sigma eps``, target velocity ``eps - x0``. The
null caption (``<null>``) gives the unconditional velocity for classifier-free guidance.
"""

from __future__ import annotations

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
from flowdppo.tasks.shapes.grammar import MAX_TOKENS, NULL_ID, PAD_ID, VOCAB, tokenize
from flowdppo.tasks.shapes.scenes import IMAGE_SIZE

#: ``nn.Linear`` names that suit LoRA (peft matches them as name suffixes): attention
#: projections (self ``qkv``, cross ``q``/``kv``, outputs ``proj``), MLPs (``fc1``/``fc2``, in
#: the caption encoder too), the adaLN modulation ``ada`` and the output layer ``out``.
LORA_TARGETS: list[str] = ["qkv", "q", "kv", "proj", "fc1", "fc2", "ada", "out"]

BASE_WEIGHTS = "shapes_base.safetensors"
IMAGE_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
#: Lower bound of sigma when an x0 prediction is turned into a velocity. Samplers evaluate
#: the model at sigma >= 0.1 with 10 steps; only the pretraining loss reaches below it.
SIGMA_FLOOR = 0.05


class ShapesAssetError(AssetError):
    """A missing or unreadable weights file of the shapes task."""


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None
) -> torch.Tensor:
    # Plain matmul attention: on CPU it beats scaled_dot_product_attention at these tiny
    # sequence lengths and head sizes.
    b, n, d = q.shape
    m, hd = k.shape[1], d // heads
    q = q.view(b, n, heads, hd).transpose(1, 2) * hd**-0.5
    k = k.view(b, m, heads, hd).transpose(1, 2)
    v = v.view(b, m, heads, hd).transpose(1, 2)
    logits = q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(q, k, v, self.heads, bias))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        return self.proj(_attend(self.q(x), k, v, self.heads, bias))


class TextBlock(nn.Module):
    """Pre-norm transformer encoder layer over caption tokens (padding masked)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        t = t + self.attn(self.norm1(t), bias)
        return t + self.fc2(F.gelu(self.fc1(self.norm2(t))))


class TextEncoder(nn.Module):
    """Caption word ids [B, L] -> (token features [B, L, D], pooled [B, D], key bias)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        self.blocks = nn.ModuleList(TextBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real = tokens != PAD_ID
        bias = torch.zeros(real.shape, device=tokens.device).masked_fill(~real, float("-inf"))
        bias = bias[:, None, None, :]  # broadcast over heads and queries
        t = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            t = block(t, bias)
        t = self.norm(t)
        weights = real.float()[..., None]
        pooled = (t * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return t, pooled, bias


class Block(nn.Module):
    """adaLN-zero transformer block: self-attention, cross-attention to the caption, MLP."""

    def __init__(self, dim: int, text_dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ada = nn.Linear(dim, 9 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.xattn = CrossAttention(dim, text_dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(
        self, h: torch.Tensor, c: torch.Tensor, text: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        mod = self.ada(c)[:, None].chunk(9, dim=-1)
        s1, b1, g1, s2, b2, g2, s3, b3, g3 = mod
        h = h + g1 * self.attn(self.norm1(h) * (1 + s1) + b1)
        h = h + g2 * self.xattn(self.norm2(h) * (1 + s2) + b2, text, bias)
        return h + g3 * self.fc2(F.gelu(self.fc1(self.norm3(h) * (1 + s3) + b3)))


class ShapesVelocityNet(nn.Module):
    """``v(x, sigma, tokens)`` for 16x16 RGB scenes conditioned on a tokenised caption."""

    def __init__(
        self,
        dim: int = 96,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: int = 2,
        text_dim: int = 64,
        text_depth: int = 1,
        patch: int = 4,
        emb_dim: int = 64,
        conv: int = 16,
        prediction: str = "x0",
    ):
        super().__init__()
        self.config = {
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "text_dim": text_dim,
            "text_depth": text_depth,
            "patch": patch,
            "emb_dim": emb_dim,
            "conv": conv,
            "prediction": prediction,
        }
        if prediction not in ("x0", "velocity"):
            raise ValueError(f"prediction must be 'x0' or 'velocity', got {prediction!r}")
        self.prediction = prediction
        if IMAGE_SIZE % patch:
            raise ValueError(f"patch {patch} does not divide the image size {IMAGE_SIZE}")
        self.patch, self.grid, self.emb_dim = patch, IMAGE_SIZE // patch, emb_dim
        self.text = TextEncoder(text_dim, text_depth, heads, mlp_ratio)
        self.time_fc = nn.Linear(emb_dim, dim)
        self.text_fc = nn.Linear(text_dim, dim)
        # Full-resolution 3x3 convolutions before and after the patch transformer: patches
        # alone leave every pixel to a linear map of its 4x4 patch, which gives speckle.
        self.conv = conv
        pix = conv if conv else 3
        if conv:
            self.stem = nn.Conv2d(3, conv, 3, padding=1)
            self.head1 = nn.Conv2d(2 * conv + 3, conv, 3, padding=1)
            self.head2 = nn.Conv2d(conv, 3, 3, padding=1)
        self.inp = nn.Linear(pix * patch * patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(self.grid**2, dim))
        self.blocks = nn.ModuleList(Block(dim, text_dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out_ada = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, pix * patch * patch)
        # adaLN-zero: every block starts as the identity and the output at zero, which
        # makes the first steps of pretraining stable.
        last = [self.head2] if conv else [self.out]
        for layer in [b.ada for b in self.blocks] + [self.out_ada] + last:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, p, g = x.shape[0], self.patch, self.grid
        text, pooled, bias = self.text(tokens)
        c = F.silu(self.time_fc(sigma_embedding(sigma, self.emb_dim)) + self.text_fc(pooled))
        f0 = F.gelu(self.stem(x)) if self.conv else x
        ch = f0.shape[1]
        h = f0.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
        h = self.inp(h) + self.pos
        for block in self.blocks:
            h = block(h, c, text, bias)
        scale, shift = self.out_ada(c)[:, None].chunk(2, dim=-1)
        h = self.out(self.norm(h) * (1 + scale) + shift)
        h = h.reshape(b, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(f0.shape)
        if self.conv:
            h = self.head2(F.gelu(self.head1(torch.cat([h, f0, x], dim=1))))
        if self.prediction == "velocity":
            return h
        # x-prediction (Li & He 2025, "Back to Basics: Let Denoising Generative Models
        # Denoise"): a 4x4-patch token cannot carry the noise a velocity must reproduce, but
        # it can carry the clean patch. v = (x - x0) / sigma, sigma floored as they do.
        s = sigma.float().clamp_min(SIGMA_FLOOR).view(-1, 1, 1, 1)
        return (x - h) / s


class ShapesModel(PixelFlowModel):
    """The ``FlowModel`` adapter of the shapes task (captions of :mod:`.grammar`)."""

    image_shape = IMAGE_SHAPE
    cond_key = "tokens"

    def encode(self, prompts: list[str]) -> Cond:
        return {"tokens": torch.tensor(tokenize(prompts), dtype=torch.long)}

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(cond, PAD_ID)
        null[:, 0] = NULL_ID
        return null


def load_base_model(path: str | Path | None = None) -> ShapesModel:
    """The shapes base model from ``path``, or the shipped weights when ``path`` is None."""
    path = assets_dir() / BASE_WEIGHTS if path is None else Path(path)
    net, _ = load_module(ShapesVelocityNet, path, "shapes base model", "shapes", ShapesAssetError)
    return ShapesModel(net)
