"""The ``model`` section: the task's built-in model or a diffusers pipeline, and fine-tuning."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, field_validator, model_validator

from flowdppo.config.base import PathKey, _Section

#: ``auto`` and the adapter modules of ``flowdppo.models.diffusers_adapters`` (kept in step
#: with its ADAPTER_MODULES; a test checks).
DIFFUSERS_KINDS = (
    "auto",
    "sd3",
    "flux",
    "wan",
    "flux2",
    "qwen_image",
    "z_image",
    "hunyuan_video15",
)
MODEL_KINDS = ("task", *DIFFUSERS_KINDS)


class ModelConfig(_Section):
    weights: PathKey = Field(None, description="base weights path; null: the task's shipped")
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] | None = Field(None, description="null: the task's default")
    # A diffusers pipeline instead of the task's own model (docs/real-models.md).
    kind: str | None = Field(
        None,
        description="task: the task's built-in model; auto: the diffusers adapter that takes "
        "model.path's pipeline class; or one adapter by name (sd3, flux, wan, flux2, "
        "qwen_image, z_image, hunyuan_video15); null: auto when model.path is set, else task",
    )
    path: PathKey = Field(None, description="local diffusers pipeline directory")
    adapter: str | None = Field(
        None, description="a user adapter class by import path, package.module:Class"
    )
    resolution: int | tuple[int, int] | None = Field(
        None, description="pixels, int or [height, width]; null: the adapter's default"
    )
    frames: int | None = Field(
        None, ge=1, description="video frames (video models only); null: the adapter's default"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    gradient_checkpointing: bool = False
    max_sequence_length: int | None = Field(
        None, ge=1, description="text tokens (T5); null: the pipeline's default"
    )
    negative_prompt: str = Field("", description="the negative prompt of guidance")
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (CUDA when available)")
    offload_text_encoders: bool = Field(
        True,
        description="keep the text encoders (and the unused VAE encoder) in CPU memory and the "
        "prompt cache on the CPU; the encoders visit the device only to encode new prompts",
    )
    forward_batch_size: int | None = Field(
        None,
        ge=1,
        description="samples per model forward in rollout, reference KL and evaluation, and "
        "the default batch of model rewards; null: the whole batch in one forward",
    )

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        if v is not None and v not in MODEL_KINDS:
            near = difflib.get_close_matches(str(v), MODEL_KINDS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"must be one of {', '.join(MODEL_KINDS)}, got {v!r}{hint}")
        return v

    @model_validator(mode="after")
    def _default_kind(self):
        if self.kind is None:
            # Not through validate_assignment: it would run this validator again.
            object.__setattr__(self, "kind", "auto" if self.path or self.adapter else "task")
        return self

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v):
        sides = (v,) if isinstance(v, int) else (v or ())
        if any(s < 8 for s in sides):
            raise ValueError(f"must be at least 8 pixels per side, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        head, _, index = v.partition(":")
        if v in ("cpu", "cuda", "auto") or (head == "cuda" and index.isdigit()):
            return v
        raise ValueError(f"must be cpu, cuda, cuda:N or auto, got {v!r}")
