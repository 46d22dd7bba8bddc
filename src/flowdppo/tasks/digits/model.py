"""The digits base model: a small class-conditional flow-matching velocity MLP and its adapter.

Rectified-flow path ``x_sigma = (1 - sigma) x0 + sigma eps`` with target velocity
``eps - x0``; sigma = 1 is pure noise. Label 10 is the null class for classifier-free guidance.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flowdppo.models.base import Cond, FlowModel
from flowdppo.tasks.digits.data import IMAGE_SHAPE, NULL_LABEL, NUM_CLASSES, prompts_to_labels

#: Names of the ``nn.Linear`` layers that suit LoRA (peft matches them as name suffixes):
#: the input projection, every block's conditioning modulation and MLP, and the output.
LORA_TARGETS: list[str] = ["inp", "ada", "fc1", "fc2", "out"]

BASE_WEIGHTS = "digits_base.safetensors"
CLASSIFIER_WEIGHTS = "digits_classifier.safetensors"
METADATA_KEY = "flowdppo"


class DigitsAssetError(ValueError):
    """A missing or unreadable weights file of the digits task."""


def assets_dir() -> Path:
    """The package folder holding the shipped weights."""
    return Path(str(resources.files("flowdppo").joinpath("assets")))


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of sigma in [0, 1] (scaled by 1000, as diffusion timesteps are)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half
    )
    args = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


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


class DigitsModel(FlowModel):
    """The ``FlowModel`` adapter of the digits task (prompts "zero" ... "nine")."""

    shift = 1.0

    def __init__(self, module: nn.Module):
        self.module = module

    def encode(self, prompts: list[str]) -> Cond:
        return {"label": prompts_to_labels(prompts)}

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, *IMAGE_SHAPE, generator=generator, device=generator.device)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        label = cond["label"].to(x.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        # Read self.module now, not at construction: reference() swaps it or disables LoRA.
        net = self.module
        if guidance_scale == 1.0:
            return net(x, sigma, label)
        null = torch.full_like(label, NULL_LABEL)
        v = net(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([label, null]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.clamp(-1, 1) + 1) / 2


def save_module(module: nn.Module, path: str | Path, metadata: dict) -> None:
    """Write a network's weights plus its constructor config and ``metadata`` (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"config": module.config, **metadata}
    # One metadata key: safetensors writes several in random order, and the same seed
    # should give a byte-identical file.
    meta = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    # A readable copy of the metadata next to the weights.
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps(info, indent=1) + "\n")
    # safetensors creates its file private (0600); give it the umask's usual mode instead.
    path.chmod(sidecar.stat().st_mode)


def load_module(cls: type[nn.Module], path: str | Path, what: str) -> tuple[nn.Module, dict]:
    """Build ``cls`` from a file written by :func:`save_module`; returns (module, metadata)."""
    path = Path(path)
    fix = "re-create it with `flowdppo pretrain --task digits` (or pass the path of a valid file)"
    if not path.is_file():
        raise DigitsAssetError(f"{what} weights not found at {path}; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(raw_meta[METADATA_KEY]) if METADATA_KEY in raw_meta else {}
        module = cls(**meta.pop("config", {}))
        module.load_state_dict(state)
    except Exception as exc:  # corrupt header, truncated data, wrong architecture, bad JSON
        raise DigitsAssetError(
            f"{what} weights at {path} could not be loaded ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    return module.eval(), meta


def load_base_model(path: str | Path | None = None) -> DigitsModel:
    """The digits base model from ``path``, or the shipped weights when ``path`` is None."""
    path = assets_dir() / BASE_WEIGHTS if path is None else Path(path)
    net, _ = load_module(DigitsVelocityNet, path, "digits base model")
    return DigitsModel(net)
