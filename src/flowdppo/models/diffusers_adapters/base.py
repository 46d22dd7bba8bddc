"""What every diffusers adapter shares: checks, prompt cache, guidance, noise, decoding.

A subclass says how to call its transformer (:meth:`_forward`), how to encode a batch of
prompts (:meth:`_encode_batch`), its latent shape and how latents become VAE input, and
which resolutions (and frame counts) its pipeline takes (:meth:`check_inputs`, answered from
the directory's JSON configs before any weight is read). The trainer keeps latents in
float32; they are cast to the model's dtype only at the transformer's input, and the
velocity comes back as float32. docs/adding-a-model.md walks through writing one.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from flowdppo.models.base import Cond, FlowModel, cat_cond

#: Where offloaded components wait (model.offload_text_encoders).
OFFLOAD_DEVICE = torch.device("cpu")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Joint-attention projections of an MMDiT block, image stream (``to_*``) and text stream
#: (``add_*``), as diffusers names them in SD3 and FLUX transformers.
JOINT_ATTENTION_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


class PipelineInputError(ValueError):
    """A setting the pipeline at ``model.path`` cannot take; ``key`` names the config key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


#: ``configs(component)`` answers a component's config as a dict (``"pipeline"``: the
#: model_index.json); read from a directory's JSON files or from a loaded pipeline.
ComponentConfigs = Callable[[str], dict]


def directory_configs(path: str | Path) -> ComponentConfigs:
    """The configs of a pipeline directory, read from its JSON files (no weights)."""
    root = Path(path)

    def read(component: str) -> dict:
        if component == "pipeline":
            file = root / "model_index.json"
        elif component == "scheduler":
            file = root / component / "scheduler_config.json"
        else:
            file = root / component / "config.json"
        if not file.is_file():
            raise PipelineInputError(
                "model.path",
                f"{str(path)!r} has no {file.relative_to(root)}: the pipeline directory is "
                "incomplete; download it again",
            )
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PipelineInputError("model.path", f"{file} is not valid JSON: {exc}") from exc

    return read


def pipeline_configs(pipe: Any) -> ComponentConfigs:
    """The same configs answered by a loaded pipeline."""

    def read(component: str) -> dict:
        if component == "pipeline":
            return dict(pipe.config)
        return dict(getattr(pipe, component).config)

    return read


def nearest_multiple(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def require_multiple(key: str, what: str, value: int, multiple: int, why: str) -> None:
    """Raise a :class:`PipelineInputError` naming ``key`` unless ``multiple`` divides ``value``."""
    if value % multiple:
        raise PipelineInputError(
            key,
            f"{key}: {what} {value} is not a multiple of {multiple} ({why}); use e.g. "
            f"{nearest_multiple(value, multiple)}",
        )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` of dynamic shifting: linear in the image token count (as diffusers' pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def pad_text(conds: list[Cond]) -> Cond:
    """Concatenate condition batches whose ``prompt_embeds`` / ``prompt_mask`` differ in
    length, padding the shorter ones with masked zeros."""
    n = max(c["prompt_embeds"].shape[1] for c in conds)

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = n - t.shape[1]
        if not extra:
            return t
        return torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)

    return {k: torch.cat([pad(c[k]) for c in conds]) for k in conds[0]}


class DiffusersFlowModel(FlowModel):
    """A diffusers pipeline seen as a :class:`FlowModel`; ``module`` is its transformer.

    ``resolution`` is an int (square) or ``(height, width)`` in pixels. Prompt encodings are
    cached per prompt (least recently used first out, ``cache_size`` entries), so the text
    encoders run once per distinct prompt.

    ``offload_text_encoders``: the text encoders (and the VAE's encoder, which sampling never
    uses) live in CPU memory; the text encoders visit the model's device only while they
    encode prompts the cache lacks. The cache then lives on the CPU too (pinned when CUDA
    is available) and each batch's rows are copied to the device as it is drawn. Off:
    everything on the device, the cache included.
    """

    #: The pipeline class names this adapter accepts (``model_index.json``'s ``_class_name``).
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: Module-name suffixes LoRA targets by default (peft's matching: ``name == t`` or
    #: ``name.endswith("." + t)``).
    lora_target_suffixes: ClassVar[tuple[str, ...]] = ()
    #: True: classifier-free guidance runs the negative prompt in the same forward.
    batched_cfg: bool = True
    #: diffusers' transformers take ``timestep = sigma * num_train_timesteps``.
    num_train_timesteps: int | None = 1000
    #: ``model.resolution`` when it is null: pixels, int or (height, width).
    default_resolution: ClassVar[int | tuple[int, int]] = 512
    #: ``model.frames`` when it is null; None: an image model, which takes no frames.
    default_frames: ClassVar[int | None] = None

    def __init__(
        self,
        pipe: Any,
        *,
        resolution: int | tuple[int, int],
        device: str | torch.device | None = None,
        max_sequence_length: int | None = None,
        negative_prompt: str = "",
        gradient_checkpointing: bool = False,
        cache_size: int = 1024,
        decode_batch_size: int = 8,
        offload_text_encoders: bool = True,
    ):
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.height, self.width = (
            (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        )
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.negative_prompt = negative_prompt
        self.cache_size = cache_size
        self.decode_batch_size = decode_batch_size
        self.transformer_config = pipe.transformer.config
        # Before any weight moves to the device (build_diffusers_model ran the same check on
        # the directory's JSON files before loading).
        self.check_inputs(pipeline_configs(pipe), self.height, self.width, self._frames())
        # Everything but the transformer is frozen and in eval mode; the trainer decides
        # what of the transformer trains (LoRA adapters or all of it).
        for name, component in pipe.components.items():
            if isinstance(component, nn.Module) and name != "transformer":
                component.requires_grad_(False).eval()
        self.offload_text_encoders = offload_text_encoders
        for name, component in pipe.components.items():
            if isinstance(component, nn.Module) and not self._offloaded(name):
                component.to(self.device)
        if offload_text_encoders and isinstance(getattr(pipe.vae, "encoder", None), nn.Module):
            pipe.vae.encoder.to(OFFLOAD_DEVICE)
        self.dtype = pipe.transformer.dtype
        if gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        self.module = pipe.transformer
        # Resolved now: once peft wraps the transformer its Linear layers are renamed.
        self._lora_targets = self._match_lora_targets(pipe.transformer)
        self._cache: OrderedDict[str, Cond] = OrderedDict()
        self._negative: Cond | None = None

    # ------------------------------------------------------------------ offload
    def _offloaded(self, component: str) -> bool:
        return self.offload_text_encoders and component.startswith("text_encoder")

    def text_encoders(self) -> list[nn.Module]:
        return [
            c
            for name, c in self.pipe.components.items()
            if name.startswith("text_encoder") and isinstance(c, nn.Module)
        ]

    @contextlib.contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the model's device for the block (offloaded: and back)."""
        if not self.offload_text_encoders:
            yield
            return
        for encoder in self.text_encoders():
            encoder.to(self.device)
        try:
            yield
        finally:
            for encoder in self.text_encoders():
                encoder.to(OFFLOAD_DEVICE)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _cache_entry(self, row: torch.Tensor) -> torch.Tensor:
        # A copy, not a view: an evicted entry must free its memory.
        if not self.offload_text_encoders:
            return row.to(self.dtype, copy=True)
        row = row.to(OFFLOAD_DEVICE, self.dtype, copy=True)
        return row.pin_memory() if torch.cuda.is_available() else row

    # ------------------------------------------------------------------ subclass hooks
    default_max_sequence_length: ClassVar[int] = 512

    @classmethod
    def check_inputs(
        cls, configs: ComponentConfigs, height: int, width: int, frames: int | None
    ) -> None:
        """Raise a :class:`PipelineInputError` naming the config key (``model.resolution``,
        ``model.frames``, ``model.path``) and a valid nearby value when the pipeline cannot take
        these settings. Answered from ``configs`` alone (the JSON files), so it runs before any
        weight is read. The default: an image model whose sides must be multiples of
        :meth:`pixel_multiple`."""
        if frames is not None:
            raise PipelineInputError(
                "model.frames",
                f"model.frames is for video models; a {configs('pipeline').get('_class_name')} "
                "generates images: drop model.frames",
            )
        multiple, why = cls.pixel_multiple(configs)
        require_multiple("model.resolution", "height", height, multiple, why)
        require_multiple("model.resolution", "width", width, multiple, why)

    @classmethod
    def pixel_multiple(cls, configs: ComponentConfigs) -> tuple[int, str]:
        """The number both image sides must be a multiple of, and why (for the error)."""
        raise NotImplementedError

    def _frames(self) -> int | None:
        return None

    def _encode_batch(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        """One transformer call on model-dtype latents; ``sigma`` is float32 [B]."""
        raise NotImplementedError

    def latent_shape(self, n: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # diffusers' randn_tensor draws on the generator's device in one call for the
        # whole batch, so the same generator state gives the pipeline's own noise.
        return torch.randn(
            self.latent_shape(n), generator=generator, device=generator.device, dtype=torch.float32
        )

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ the schedule
    @property
    def shift(self) -> float:  # type: ignore[override]
        """The static time shift equivalent to the pipeline's schedule at this resolution."""
        config = self.pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            return math.exp(self.mu)
        return float(config.get("flow_shift", None) or config.get("shift", 1.0))

    @property
    def mu(self) -> float:
        """Dynamic-shifting ``mu`` for this resolution (FLUX); unused with a static shift."""
        config = self.pipe.scheduler.config
        return calculate_shift(
            self.image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    @property
    def image_seq_len(self) -> int:
        raise NotImplementedError

    def schedule_mu(self, num_steps: int) -> float:
        """The ``mu`` the pipeline passes to ``set_timesteps`` for ``num_steps`` steps."""
        return self.mu

    def _pipeline_base_sigmas(self, num_steps: int) -> Any:
        """The ``sigmas`` the pipeline passes to ``set_timesteps`` (None: the default)."""
        return None

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's own ``num_steps + 1`` noise levels (float32, CPU, ending in 0).

        Computed by a fresh flow-matching Euler scheduler with the pipeline's scheduler
        config, so shift, dynamic shifting and spacing are exactly the pipeline's. A
        multistep scheduler (Wan's UniPC) is replaced by the Euler one with its
        ``flow_shift``: the RL sampler takes Euler / SDE steps on that schedule.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(self.pipe.scheduler.config)
        if not isinstance(self.pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            config = {
                "num_train_timesteps": config.get("num_train_timesteps", 1000),
                "shift": self.shift,
            }
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        kwargs = (
            {"mu": self.schedule_mu(num_steps)} if scheduler.config.use_dynamic_shifting else {}
        )
        scheduler.set_timesteps(num_steps, sigmas=self._pipeline_base_sigmas(num_steps), **kwargs)
        return scheduler.sigmas.float().cpu()

    # ------------------------------------------------------------------ FlowModel
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with self._text_encoders_on_device():
                encoded = self._encode_batch(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: self._cache_entry(v[i : i + 1]) for k, v in encoded.items()}
        out = self._collate([self._cache[p] for p in prompts])
        out = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    @torch.no_grad()
    def negative_cond(self) -> Cond:
        """The negative prompt's encoding (one row), for classifier-free guidance."""
        if self._negative is None:
            with self._text_encoders_on_device():
                enc = self._encode_batch([self.negative_prompt])
            self._negative = {k: v.to(self.dtype) for k, v in enc.items()}
        return self._negative

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._noise(n, generator).to(self.device)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).reshape(-1)
        sigma = sigma.expand(b) if sigma.numel() == 1 else sigma
        h = x.to(self.device, self.dtype)
        if guidance_scale == 1.0 or not self.batched_cfg:
            return self._forward(h, sigma, cond, guidance_scale).float()
        # Negative and positive rows in one forward; combined in float32, where the
        # difference of two close predictions loses nothing (bf16 would).
        neg = {k: v.expand(b, *v.shape[1:]) for k, v in self.negative_cond().items()}
        both = self._collate([neg, cond])
        out = self._forward(torch.cat([h, h]), torch.cat([sigma, sigma]), both, guidance_scale)
        uncond, text = out.float().chunk(2)
        return self._guide(uncond, text, guidance_scale)

    def _guide(self, uncond: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance with weight ``scale`` (1: the text prediction)."""
        return uncond + scale * (text - uncond)

    def _collate(self, conds: list[Cond]) -> Cond:
        """Condition batches concatenated along the batch (padded text: see qwen_image)."""
        return cat_cond(conds)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32 [B, 3, H, W] (Wan: videos [B, 3, F, H, W])."""
        chunks = [self._decode_chunk(c.to(self.device)) for c in x.split(self.decode_batch_size)]
        return (torch.cat(chunks).float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ LoRA
    def default_lora_targets(self) -> list[str]:
        """Full names of the transformer's Linear modules matching ``lora_target_suffixes``.

        Full names are unambiguous for peft and for ``apply_finetuning``'s check (which
        matches a target against the last name segment, and ``to_out.0`` has two).
        """
        return list(self._lora_targets)

    def _match_lora_targets(self, module: nn.Module) -> list[str]:
        names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        return [
            n
            for n in names
            if any(n == t or n.endswith("." + t) for t in self.lora_target_suffixes)
        ]

    # ------------------------------------------------------------------ helpers
    def _vae_dtype(self) -> torch.dtype:
        return self.pipe.vae.dtype
