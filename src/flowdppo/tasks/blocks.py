"""The conditioned flow transformer the built-in pixel tasks are made of (shapes, text).

* :class:`TokenEncoder`: token ids -> embeddings + learned positions -> pre-norm transformer
  layers -> per-token features, their mean over real tokens (pooled) and the padding bias;
* :class:`Block`: adaLN-zero (scale, shift, gate from sigma and the pooled condition) around
  self-attention, cross-attention to the tokens (where binding is learned), and an MLP;
* :class:`FlowTransformer`: optional full-resolution 3x3 convolutions around a patch
  transformer of those blocks; it predicts the clean image, and :func:`x0_to_velocity`
  turns that into the rectified-flow velocity;
* :class:`TokenFlowModel`: the ``FlowModel`` adapter of such a network (prompts -> token ids,
  the null condition for classifier-free guidance).

A task subclasses :class:`FlowTransformer` with its own encoder, image size and inputs (the
text task adds a glyph channel). The parameter names and the order they are created in are
fixed here: the shipped weights load by those names, and the order fixes the random draws,
so a seeded pretraining run gives the same bytes. :func:`patchify` and :func:`unpatchify`
cut any number of trailing axes (a video's frames, rows and columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flowdppo.models.base import Cond
from flowdppo.tasks.common import PixelFlowModel, sigma_embedding

#: ``nn.Linear`` names that suit LoRA (peft matches them as name suffixes): attention
#: projections (self ``qkv``, cross ``q``/``kv``, outputs ``proj``), MLPs (``fc1``/``fc2``, in
#: the token encoder too), the adaLN modulation ``ada`` and the output layer ``out``.
LORA_TARGETS: list[str] = ["qkv", "q", "kv", "proj", "fc1", "fc2", "ada", "out"]

#: Lower bound of sigma when an x0 prediction is turned into a velocity. Samplers evaluate
#: the model at sigma >= 0.1 with 10 steps; only the pretraining loss reaches below it.
SIGMA_FLOOR = 0.05


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
    """Pre-norm transformer encoder layer over tokens (padding masked)."""

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


class TokenEncoder(nn.Module):
    """Token ids [B, L] -> (token features [B, L, D], pooled [B, D], key bias [B, 1, 1, L]).

    ``pad_id`` tokens are masked out of attention and of the pooled mean. Positions start at
    zero, or at ``0.02 N(0, 1)`` with ``random_positions``. A subclass adds its own embedding
    tables in :meth:`add_embeddings` (called between the positions and the layers, which
    fixes the order of the parameters and of the random draws) and sums them in
    :meth:`embeddings`.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        *,
        pad_id: int,
        random_positions: bool = False,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim)
        pos = 0.02 * torch.randn(max_len, dim) if random_positions else torch.zeros(max_len, dim)
        self.pos = nn.Parameter(pos)
        self.add_embeddings(max_len, dim)
        self.blocks = nn.ModuleList(TextBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def add_embeddings(self, max_len: int, dim: int) -> None:
        """Register further embedding tables (none here)."""

    def embeddings(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The layers' input [B, L, D]; ``real`` marks the tokens that are not padding."""
        return self.embed(tokens) + self.pos[: tokens.shape[1]]

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real = tokens != self.pad_id
        t = self.embeddings(tokens, real)
        bias = torch.zeros(real.shape, device=tokens.device).masked_fill(~real, float("-inf"))
        bias = bias[:, None, None, :]  # broadcast over heads and queries
        for block in self.blocks:
            t = block(t, bias)
        t = self.norm(t)
        weights = real.float()[..., None]
        pooled = (t * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return t, pooled, bias


class Block(nn.Module):
    """adaLN-zero transformer block: self-attention, cross-attention to the tokens, MLP."""

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


#: The transformer's size, shared by the tasks' networks: width, blocks, heads, MLP ratio, and
#: the token encoder's width and layers. A network takes them as keyword arguments.
TRUNK_DEFAULTS = {
    "dim": 96,
    "depth": 3,
    "heads": 4,
    "mlp_ratio": 2,
    "text_dim": 64,
    "text_depth": 1,
}


def trunk_config(trunk: dict, **own) -> dict:
    """A network's ``config``, saved with its weights to rebuild it: the transformer's size
    (``trunk``, the defaults where it says nothing) and then its ``own`` arguments."""
    unknown = sorted(set(trunk) - set(TRUNK_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unexpected arguments {unknown}; the transformer's size is set by "
            f"{', '.join(TRUNK_DEFAULTS)}"
        )
    return {**TRUNK_DEFAULTS, **trunk, **own}


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """[B, C, *size] -> [B, patches, C * prod(patch)], patches in row-major grid order.

    ``patch`` has one entry per trailing axis (2 for images, 3 for frames x rows x columns)
    and divides each.
    """
    b, c, *size = x.shape
    n = len(size)
    grid = [s // p for s, p in zip(size, patch)]
    split = [v for g, p in zip(grid, patch) for v in (g, p)]
    order = [0, *(2 + 2 * i for i in range(n)), 1, *(3 + 2 * i for i in range(n))]
    return x.reshape(b, c, *split).permute(order).reshape(b, math.prod(grid), -1)


def unpatchify(h: torch.Tensor, size: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`patchify`: [B, patches, C * prod(patch)] -> [B, C, *size]."""
    b, n = h.shape[0], len(size)
    grid = [s // p for s, p in zip(size, patch)]
    c = h.shape[-1] // math.prod(patch)
    order = [0, n + 1, *(v for i in range(n) for v in (1 + i, n + 2 + i))]
    return h.reshape(b, *grid, c, *patch).permute(order).reshape(b, c, *size)


def x0_to_velocity(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The velocity ``(x - x0) / sigma`` of an x0 prediction, sigma floored at ``SIGMA_FLOOR``.

    x-prediction (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"):
    a patch token cannot carry the noise a velocity must reproduce, but it can carry the
    clean patch; the floor is theirs.
    """
    s = sigma.float().clamp_min(SIGMA_FLOOR).view(-1, *([1] * (x.dim() - 1)))
    return (x - x0) / s


class FlowTransformer(nn.Module):
    """A patch transformer of adaLN-zero :class:`Block` s conditioned on sigma and tokens.

    ``config`` holds the subclass's constructor arguments (:func:`trunk_config`): the
    transformer's size, ``emb_dim`` (sigma features) and ``conv``. ``encoder(text_dim,
    text_depth, heads, mlp_ratio)`` builds the token encoder, a :class:`TokenEncoder`.

    ``trunk(x, inputs, sigma, tokens)`` maps the noisy image ``x`` [B, channels, *size] (and
    ``inputs``, ``x`` with any extra channels a task stacks on it, ``in_channels`` in all)
    to an image of ``channels``:

    * condition ``c = silu(time_fc(sigma features) + text_fc(pooled tokens))``;
    * with ``conv``: a 3x3 ``stem`` to ``conv`` features at full resolution (patches alone
      leave every pixel to a linear map of its patch, which gives speckle), and after the
      transformer ``head2(gelu(head1([h, stem features, x])))``;
    * ``patch``-sized patches with learned positions -> ``depth`` blocks -> adaLN output
      layer -> pixels.

    adaLN-zero: every block starts as the identity and the output at zero, which makes the
    first steps of pretraining stable.
    """

    def __init__(
        self,
        encoder: Callable[[int, int, int, int], nn.Module],
        config: dict,
        *,
        size: tuple[int, ...],
        patch: tuple[int, ...],
        channels: int,
        in_channels: int,
    ):
        super().__init__()
        if any(s % p for s, p in zip(size, patch)):
            raise ValueError(
                f"patch {'x'.join(map(str, patch))} does not divide the image size "
                f"{'x'.join(map(str, size))}"
            )
        #: The subclass's constructor arguments, saved with the weights to rebuild it.
        self.config = config
        dim, depth, heads, mlp_ratio = (config[k] for k in ("dim", "depth", "heads", "mlp_ratio"))
        text_dim, emb_dim, conv = config["text_dim"], config["emb_dim"], config["conv"]
        self.size, self.patch_size, self.channels = tuple(size), tuple(patch), channels
        self.emb_dim, self.conv = emb_dim, conv
        patches = math.prod(s // p for s, p in zip(size, patch))
        self.text = encoder(text_dim, config["text_depth"], heads, mlp_ratio)
        self.time_fc = nn.Linear(emb_dim, dim)
        self.text_fc = nn.Linear(text_dim, dim)
        pix = conv if conv else in_channels
        if conv:
            self.stem = nn.Conv2d(in_channels, conv, 3, padding=1)
            self.head1 = nn.Conv2d(2 * conv + channels, conv, 3, padding=1)
            self.head2 = nn.Conv2d(conv, channels, 3, padding=1)
        self.inp = nn.Linear(pix * math.prod(patch), dim)
        self.pos = nn.Parameter(0.02 * torch.randn(patches, dim))
        self.blocks = nn.ModuleList(Block(dim, text_dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out_ada = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, pix * math.prod(patch))
        last = [self.head2] if conv else [self.out]
        for layer in [b.ada for b in self.blocks] + [self.out_ada] + last:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def trunk(
        self, x: torch.Tensor, inputs: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        text, pooled, bias = self.text(tokens)
        c = F.silu(self.time_fc(sigma_embedding(sigma, self.emb_dim)) + self.text_fc(pooled))
        f0 = F.gelu(self.stem(inputs)) if self.conv else inputs
        h = self.inp(patchify(f0, self.patch_size)) + self.pos
        for block in self.blocks:
            h = block(h, c, text, bias)
        scale, shift = self.out_ada(c)[:, None].chunk(2, dim=-1)
        h = self.out(self.norm(h) * (1 + scale) + shift)
        h = unpatchify(h, self.size, self.patch_size)
        if not self.conv:
            return h[:, : self.channels]
        return self.head2(F.gelu(self.head1(torch.cat([h, f0, x], dim=1))))


class TokenFlowModel(PixelFlowModel):
    """The ``FlowModel`` adapter of a network conditioned on token ids.

    Subclasses set ``tokenize`` (prompts -> rows of token ids of one length), ``pad_id`` and ``null_id``:
    the null condition is ``null_id`` followed by padding.
    """

    cond_key = "tokens"
    pad_id: int
    null_id: int

    @staticmethod
    def tokenize(prompts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> Cond:
        return {"tokens": torch.tensor(self.tokenize(prompts), dtype=torch.long)}

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(cond, self.pad_id)
        null[:, 0] = self.null_id
        return null
