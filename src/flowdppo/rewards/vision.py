"""Rewards for real image and video generators: CLIP score, PickScore, aesthetic, JPEG size.

Each reward is registered by name. Its factory's keyword arguments are its options, set
per run in ``reward.options``; each path falls back to an environment variable::

    flowdppo train ... reward.names=[clip_score] \
        reward.options.clip_score.path=/models/clip-vit-large-patch14
    FLOWDPPO_CLIP_PATH=/models/clip-vit-large-patch14 flowdppo train ... reward.names=[clip_score]
    vision.clip_score(path="/models/clip-vit-large-patch14", device="cuda")  # in code

The registry imports this module when a run names one of these rewards; transformers is
imported only when a CLIP-based reward is built.

| name | what | options (environment variable) |
|---|---|---|
| ``clip_score`` | cosine of CLIP image and prompt embeddings | ``path`` (``FLOWDPPO_CLIP_PATH``) |
| ``pickscore`` | ``logit_scale * cosine`` of a PickScore CLIP | ``path`` (``FLOWDPPO_PICKSCORE_PATH``), ``processor_path`` (``FLOWDPPO_PICKSCORE_PROCESSOR_PATH``, default ``path``) |
| ``aesthetic`` | MLP head on the normalised CLIP image embedding (LAION predictor v2 layout) | ``path`` (``FLOWDPPO_AESTHETIC_CLIP_PATH``), ``head`` (``FLOWDPPO_AESTHETIC_HEAD``, a safetensors file) |
| ``jpeg_compressibility`` | minus the JPEG size in kB (quality 95) | none |
| ``jpeg_incompressibility`` | the JPEG size in kB | none |

Every model reward also takes ``device`` (default CUDA when available) and ``batch_size``.
Images are [B, 3, H, W] in [0, 1]; videos [B, 3, F, H, W] are scored frame by frame and
averaged over frames. Rewards return float32 [B] on the CPU.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowdppo.rewards import Reward, register_reward

ENV = {
    "clip_score": {"path": "FLOWDPPO_CLIP_PATH"},
    "pickscore": {
        "path": "FLOWDPPO_PICKSCORE_PATH",
        "processor_path": "FLOWDPPO_PICKSCORE_PROCESSOR_PATH",
    },
    "aesthetic": {"path": "FLOWDPPO_AESTHETIC_CLIP_PATH", "head": "FLOWDPPO_AESTHETIC_HEAD"},
}


def _option(reward: str, key: str, value: str | None, required: bool = True) -> str | None:
    """An explicit option, else its environment variable, else a clear error."""
    if value is not None:
        return str(value)
    env = ENV[reward][key]
    if os.environ.get(env):
        return os.environ[env]
    if required:
        raise ValueError(
            f"reward {reward!r} needs its {key}: set the environment variable {env} to a local "
            f"directory (or pass {key}=... to the reward factory)"
        )
    return None


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def as_frames(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Images [B, 3, H, W] as they are, or videos [B, 3, F, H, W] as [B * F, 3, H, W].

    Returns the frames and the number of frames per sample (1 for images), so a per-frame
    score ``s`` of shape [B * F] averages as ``s.view(B, F).mean(1)``.
    """
    if images.dim() == 4:
        return images, 1
    if images.dim() == 5:
        b, c, f, h, w = images.shape
        return images.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), f
    raise ValueError(
        f"a reward takes images [B, 3, H, W] or videos [B, 3, F, H, W], got {tuple(images.shape)}"
    )


def per_sample(fn: Callable[[torch.Tensor, list[str]], torch.Tensor]) -> Reward:
    """Lift a per-image score to videos: score every frame, average over frames."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        frames, f = as_frames(images)
        if len(prompts) * f != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} samples")
        scores = fn(frames, [p for p in prompts for _ in range(f)])
        return scores.detach().float().cpu().view(-1, f).mean(1)

    return reward


class ClipPreprocess:
    """CLIP's image preprocessing in torch: resize the short side, centre-crop, normalise.

    Decoded samples are already tensors, so this avoids a round trip through PIL; the
    numbers come from the checkpoint's image-processor config.
    """

    def __init__(self, image_processor):
        def get(d, key):
            return d[key] if d is not None else None

        self.short = get(image_processor.size, "shortest_edge") or get(
            image_processor.size, "height"
        )
        crop = image_processor.crop_size
        self.crop = (get(crop, "height"), get(crop, "width")) if crop else (self.short,) * 2
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        h, w = x.shape[-2:]
        scale = self.short / min(h, w)
        size = (max(self.crop[0], round(h * scale)), max(self.crop[1], round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        x = x[..., top : top + self.crop[0], left : left + self.crop[1]]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class ClipEmbedder:
    """Normalised CLIP image and text embeddings from a local ``CLIPModel`` directory."""

    def __init__(
        self,
        path: str,
        processor_path: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        from transformers import CLIPModel, CLIPProcessor

        _require_dir(path, "CLIPModel")
        self.device = _device(device)
        self.model = CLIPModel.from_pretrained(path).to(self.device).eval().requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(processor_path or path)
        self.tokenizer = processor.tokenizer
        self.preprocess = ClipPreprocess(processor.image_processor)
        self.batch_size = batch_size
        self.dtype = self.model.dtype

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in images.split(self.batch_size):
            pixels = self.preprocess(chunk.to(self.device)).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(
                prompts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tok.input_ids, attention_mask=tok.attention_mask
            ).pooler_output
            out.append(F.normalize(self.model.text_projection(pooled).float(), dim=-1))
        return torch.cat(out)


def _require_dir(path: str, what: str) -> None:
    if not Path(path).expanduser().is_dir():
        raise FileNotFoundError(
            f"{what} directory {path!r} does not exist; download the weights there "
            "(huggingface-cli download <repo> --local-dir DIR) and point the reward at it"
        )


def clip_score(
    path: str | None = None, device: str | torch.device | None = None, batch_size: int = 32
) -> Reward:
    """Cosine similarity of CLIP image and prompt embeddings, in [-1, 1]."""
    clip = ClipEmbedder(_option("clip_score", "path", path), None, device, batch_size)

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (clip.images(images) * clip.texts(prompts)).sum(-1)

    return per_sample(score)


def pickscore(
    path: str | None = None,
    processor_path: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> Reward:
    """PickScore: ``logit_scale.exp() * cosine`` (about 18-23 for real images)."""
    clip = ClipEmbedder(
        _option("pickscore", "path", path),
        _option("pickscore", "processor_path", processor_path, required=False),
        device,
        batch_size,
    )
    scale = float(clip.model.logit_scale.exp())

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return scale * (clip.images(images) * clip.texts(prompts)).sum(-1)

    return per_sample(score)


class LinearStack(nn.Module):
    """Linear layers applied in order with no activation: the LAION aesthetic MLP at eval
    time (its dropouts are identities), loaded from ``layers.{i}.weight/bias`` tensors."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
        if not indices:
            raise ValueError(
                "the aesthetic head holds no 'layers.{i}.weight' tensors; convert the LAION "
                "predictor's state dict to safetensors as docs/real-models.md shows"
            )
        self.layers = nn.ModuleList()
        for i in indices:
            w, b = state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")
            layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            with torch.no_grad():
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def aesthetic(
    path: str | None = None,
    head: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> Reward:
    """An MLP head (safetensors, ``layers.{i}.*``) on the normalised CLIP image embedding."""
    from safetensors.torch import load_file

    head_path = _option("aesthetic", "head", head)
    if not Path(head_path).expanduser().is_file():
        raise FileNotFoundError(f"aesthetic head file {head_path!r} does not exist")
    clip = ClipEmbedder(_option("aesthetic", "path", path), None, device, batch_size)
    mlp = LinearStack(load_file(head_path)).to(clip.device).eval().requires_grad_(False)
    width = mlp.layers[0].in_features
    projection = clip.model.visual_projection.out_features
    if width != projection:
        raise ValueError(
            f"aesthetic head {head_path!r} takes {width}-dim embeddings but the CLIP model at "
            f"{clip.model.name_or_path!r} gives {projection}; pair the head with its CLIP"
        )

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return mlp(clip.images(images)).squeeze(-1)

    return per_sample(score)


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG size in kB of each image [N, 3, H, W] in [0, 1] (DDPO's compressibility)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(quality: int = 95) -> Reward:
    return per_sample(lambda images, prompts: -jpeg_size_kb(images, quality))


def jpeg_incompressibility(quality: int = 95) -> Reward:
    return per_sample(lambda images, prompts: jpeg_size_kb(images, quality))


FACTORIES: dict[str, Callable[..., Reward]] = {
    "clip_score": clip_score,
    "pickscore": pickscore,
    "aesthetic": aesthetic,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}

for _name, _factory in FACTORIES.items():
    register_reward(_name)(_factory)
