"""Pieces shared by the built-in tasks: shipped weights, sigma features, Euler sampling."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flowdppo.models.base import Cond, FlowModel
from flowdppo.schedule import shift_sigmas

#: The one safetensors metadata key holding a shipped network's config and provenance.
METADATA_KEY = "flowdppo"

#: The rollout the text and shapes tasks recommend to methods with SDE steps (their
#: ``recommended_sde``): dpm2 on every other level between and after the SDE steps, a
#: group's prefix computed once, evaluations with Euler on every level. Over 3 seeds on each
#: task, no loss of reward at 39-41 % fewer rollout forwards (docs/cost.md, "Rollout forwards").
FAST_ROLLOUT = {
    "sampler": {"solver": "dpm2", "ode_stride": 2, "shared_prefix": True, "merge_lora": True},
    "train": {"fuse_steps": True},
    "log": {"eval_solver": "euler"},
}


class AssetError(ValueError):
    """A missing or unreadable weights file of a built-in task."""


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


def save_module(module: nn.Module, path: str | Path, metadata: dict) -> None:
    """Write a network's weights plus its constructor ``config`` and ``metadata``.

    A readable copy of the metadata is written next to the weights as ``.json``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"config": module.config, **metadata}
    # One metadata key: safetensors writes several in random order, and the same seed
    # should give a byte-identical file.
    meta = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps(info, indent=1) + "\n")
    # safetensors creates its file private (0600); give it the umask's usual mode instead.
    path.chmod(sidecar.stat().st_mode)


def load_module(
    cls: type[nn.Module],
    path: str | Path,
    what: str,
    task: str,
    error: type[AssetError] = AssetError,
) -> tuple[nn.Module, dict]:
    """Build ``cls`` from a file written by :func:`save_module`: (module in eval mode, metadata).

    A missing or unreadable file (corrupt header, truncated data, another architecture) is an
    ``error`` naming ``path`` and how to re-create it.
    """
    path = Path(path)
    fix = f"re-create it with `flowdppo pretrain --task {task}` (or pass the path of a valid file)"
    if not path.is_file():
        raise error(f"{what} weights not found at {path}; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(raw_meta[METADATA_KEY]) if METADATA_KEY in raw_meta else {}
        module = cls(**meta.pop("config", {}))
        module.load_state_dict(state)
    except Exception as exc:  # corrupt header, truncated data, wrong architecture, bad JSON
        raise error(
            f"{what} weights at {path} could not be loaded ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    return module.eval(), meta


class PixelFlowModel(FlowModel):
    """A task network on pixels in [-1, 1] with one conditioning tensor and a null condition.

    Subclasses set ``image_shape`` and ``cond_key`` and implement ``encode`` and
    ``null_condition``; guidance batches the condition and the null condition in one forward,
    ``v_uncond + g (v_cond - v_uncond)``.
    """

    shift = 1.0
    image_shape: tuple[int, ...]
    cond_key: str

    def __init__(self, module: nn.Module):
        self.module = module

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of a batch of conditions."""
        raise NotImplementedError

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, *self.image_shape, generator=generator, device=generator.device)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        c = cond[self.cond_key].to(x.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        # Read self.module now, not at construction: reference() swaps it or disables LoRA.
        net = self.module
        if guidance_scale == 1.0:
            return net(x, sigma, c)
        v = net(
            torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([c, self.null_condition(c)])
        )
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.clamp(-1, 1) + 1) / 2


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Use at most ``n`` torch threads inside the block (pretraining on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def euler_sample(
    model: FlowModel,
    prompts: list[str],
    steps: int = 10,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Decoded samples, one per prompt, from Euler ODE steps on ``linspace(1, 0, steps + 1)``
    time-shifted by the model's ``shift`` (1 for digits and shapes: no shift).

    The noise is drawn for all prompts at once, so results do not depend on ``batch_size``.
    """
    generator = generator or torch.Generator().manual_seed(0)
    noise = model.initial_noise(len(prompts), generator)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    if model.shift != 1.0:
        sigmas = shift_sigmas(sigmas, model.shift)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cond = model.encode(chunk)
        x = noise[start : start + batch_size]
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = model.velocity(x, s.expand(len(chunk)), cond, guidance_scale)
            x = x + (s_next - s) * v
        out.append(model.decode(x))
    return torch.cat(out)
