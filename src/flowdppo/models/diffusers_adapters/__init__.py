"""Real generators through diffusers' public pipeline classes: SD3/SD3.5, FLUX.1, Wan 2.1.

``build_diffusers_model(kind, path, ...)`` loads a pipeline saved with ``save_pretrained``
(a local directory; a hub id also passes through) and wraps it as a
:class:`~flowdppo.models.base.FlowModel` whose ``module`` is the transformer.
``save_lora_for_diffusers(model, out_dir)`` writes trained LoRA adapters in the format
``pipeline.load_lora_weights(out_dir)`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flowdppo.models.diffusers_adapters.base import DiffusersFlowModel, resolve_dtype
from flowdppo.models.diffusers_adapters.flux import FLUX_LORA_TARGETS, FluxModel
from flowdppo.models.diffusers_adapters.sd3 import SD3_LORA_TARGETS, SD3Model
from flowdppo.models.diffusers_adapters.wan import WAN_LORA_TARGETS, WanModel

ADAPTERS: dict[str, type[DiffusersFlowModel]] = {
    "sd3": SD3Model,
    "flux": FluxModel,
    "wan": WanModel,
}

#: Default LoRA target module-name suffixes per model family.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "sd3": SD3_LORA_TARGETS,
    "flux": FLUX_LORA_TARGETS,
    "wan": WAN_LORA_TARGETS,
}

__all__ = [
    "ADAPTERS",
    "DEFAULT_LORA_TARGETS",
    "DiffusersFlowModel",
    "FluxModel",
    "SD3Model",
    "WanModel",
    "build_diffusers_model",
    "check_pipeline_path",
    "save_lora_for_diffusers",
]


def build_diffusers_model(
    kind: str,
    path: str | Path,
    *,
    resolution: int | tuple[int, int],
    frames: int | None = None,
    dtype: str | torch.dtype = "bfloat16",
    gradient_checkpointing: bool = False,
    device: str | torch.device | None = None,
    **adapter_kwargs: Any,
) -> DiffusersFlowModel:
    """Load the pipeline at ``path`` and wrap it as the ``kind`` adapter.

    ``kind``: ``sd3``, ``flux`` or ``wan``. ``resolution``: pixels (int: square, or
    ``(height, width)``). ``frames``: video frames (Wan only; default 81). ``dtype``:
    ``float32``, ``bfloat16`` or ``float16`` for every component. ``device``: default CUDA
    when available. Further keywords (``max_sequence_length``, ``negative_prompt``,
    ``cache_size``, ``decode_batch_size``) go to the adapter.
    """
    if kind not in ADAPTERS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(ADAPTERS)}")
    cls = ADAPTERS[kind]
    torch_dtype = resolve_dtype(dtype)
    if frames is not None and kind != "wan":
        raise ValueError(f"frames is for video models (wan); {kind} generates images")
    hub_id = _check_pipeline_path(kind, cls, str(path))

    from diffusers import DiffusionPipeline

    from flowdppo.verbosity import quiet_progress_bars

    quiet_progress_bars()  # unless --verbose: no bar per pipeline component
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), **{_dtype_keyword(): torch_dtype})
    except (OSError, ValueError) as exc:
        tried = " (no such local directory, so it was tried as a hub id)" if hub_id else ""
        raise ValueError(
            f"could not load a diffusers pipeline from {path!r}{tried}: {exc}. Point the model "
            "path at a directory written by pipeline.save_pretrained or huggingface-cli download"
        ) from exc
    found = type(pipe).__name__
    if found not in cls.pipeline_classes:
        raise ValueError(_wrong_pipeline(kind, cls, str(path), found))
    kwargs = dict(adapter_kwargs)
    if kind == "wan":
        kwargs["frames"] = 81 if frames is None else frames
    return cls(
        pipe,
        resolution=resolution,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
        **kwargs,
    )


def check_pipeline_path(kind: str, path: str | Path) -> None:
    """Raise (naming the fix) unless ``path`` can hold a ``kind`` pipeline; reads no weights.

    A hub id (``owner/name`` that is not a local path) passes: ``from_pretrained`` decides.
    """
    if kind not in ADAPTERS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(ADAPTERS)}")
    _check_pipeline_path(kind, ADAPTERS[kind], str(path))


def _dtype_keyword() -> str:
    # diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns).
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _check_pipeline_path(kind: str, cls: type[DiffusersFlowModel], path: str) -> bool:
    """Fail before loading anything when ``path`` cannot hold the right pipeline.

    Returns True when ``path`` is not a local path but looks like a hub id.
    """
    p = Path(path).expanduser()
    looks_like_hub_id = (
        not p.exists()
        and path.count("/") == 1
        and not path.startswith((".", "/", "~"))
        and not path.endswith("/")
    )
    if looks_like_hub_id:
        return True  # from_pretrained resolves it (or says why it cannot)
    if not p.exists():
        raise FileNotFoundError(
            f"model path {path!r} does not exist. Download the {kind} pipeline there (e.g. "
            "huggingface-cli download <repo> --local-dir DIR) or fix the path"
        )
    index = p / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"{path!r} is not a diffusers pipeline directory (no model_index.json). Point "
            f"the model path at the directory that holds the {kind} pipeline's model_index.json"
        )
    try:
        found = json.loads(index.read_text()).get("_class_name", "?")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index} is not valid JSON: {exc}") from exc
    if found not in cls.pipeline_classes:
        raise ValueError(_wrong_pipeline(kind, cls, path, found))
    return False


def _wrong_pipeline(kind: str, cls: type[DiffusersFlowModel], path: str, found: str) -> str:
    fits = [k for k, c in ADAPTERS.items() if found in c.pipeline_classes]
    hint = f"use model kind {fits[0]!r}" if fits else "no adapter supports it"
    return (
        f"{path!r} holds a {found}, but model kind {kind!r} needs "
        f"{' or '.join(cls.pipeline_classes)}: {hint}, or point at a {kind} pipeline"
    )


def save_lora_for_diffusers(model: DiffusersFlowModel, out_dir: str | Path) -> Path:
    """Write the transformer's LoRA adapters where ``pipeline.load_lora_weights`` reads them.

    The file is diffusers' ``pytorch_lora_weights.safetensors`` with the LoRA config
    (rank, alpha, targets) as metadata, so a plain pipeline reproduces the adapted
    transformer, scaling included.
    """
    from peft.utils import get_peft_model_state_dict

    module = model.module
    config = getattr(module, "peft_config", {}).get("default")
    if config is None:
        raise ValueError(
            "the model has no LoRA adapters to export (was it set up with "
            "apply_finetuning(model, 'lora', ...)?); a fully fine-tuned transformer is saved "
            "with model.pipe.transformer.save_pretrained(out_dir) instead"
        )
    state = get_peft_model_state_dict(module)
    # A PeftModel prefixes its base model's names; diffusers expects the transformer's own.
    prefix = "base_model.model."
    state = {k.removeprefix(prefix): v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {
        k: (sorted(v) if isinstance(v, set) else v)
        for k, v in config.to_dict().items()
        if k in ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_dora")
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    type(model.pipe).save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    return out
