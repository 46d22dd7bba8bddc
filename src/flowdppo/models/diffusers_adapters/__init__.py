"""Real generators through diffusers' public pipeline classes, one adapter module per family.

Each module here (``sd3``, ``flux``, ``wan``, ``flux2``, ``qwen_image``, ``z_image``)
declares ``PIPELINE_CLASSES`` (the ``_class_name`` values of ``model_index.json`` it takes)
and ``ADAPTER`` (its :class:`DiffusersFlowModel` subclass); the module's name is its
``model.kind``. ``build_diffusers_model(kind, path, ...)`` checks a local pipeline directory
(written by ``save_pretrained`` or ``huggingface-cli download``) from its JSON configs
alone, then loads it with ``from_pretrained`` and wraps it as a
:class:`~flowdppo.models.base.FlowModel` whose ``module`` is the transformer. ``kind="auto"``
picks the adapter from ``model_index.json``. A user's own adapter class is named by import
path (``adapter="package.module:Class"``, the config's ``model.adapter``).
``save_lora_for_diffusers(model, out_dir)`` writes trained LoRA adapters in the format
``pipeline.load_lora_weights(out_dir)`` reads.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from flowdppo.models.diffusers_adapters.base import (
    DiffusersFlowModel,
    PipelineInputError,
    directory_configs,
    resolve_dtype,
)
from flowdppo.models.diffusers_adapters.flux import FluxModel
from flowdppo.models.diffusers_adapters.sd3 import SD3Model
from flowdppo.models.diffusers_adapters.wan import WanModel

#: The adapter modules, each one ``model.kind``.
ADAPTER_MODULES = ("sd3", "flux", "wan", "flux2", "qwen_image", "z_image")

ADAPTERS: dict[str, type[DiffusersFlowModel]] = {}
for _kind in ADAPTER_MODULES:
    _module = importlib.import_module(f"{__name__}.{_kind}")
    if set(_module.PIPELINE_CLASSES) != set(_module.ADAPTER.pipeline_classes):
        raise RuntimeError(f"{_module.__name__}: PIPELINE_CLASSES and ADAPTER disagree")
    ADAPTERS[_kind] = _module.ADAPTER

#: Default LoRA target module-name suffixes per model family.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    k: c.lora_target_suffixes for k, c in ADAPTERS.items()
}

__all__ = [
    "ADAPTERS",
    "ADAPTER_MODULES",
    "DEFAULT_LORA_TARGETS",
    "DiffusersFlowModel",
    "FluxModel",
    "PipelineInputError",
    "SD3Model",
    "WanModel",
    "build_diffusers_model",
    "check_pipeline",
    "load_adapter_class",
    "save_lora_for_diffusers",
    "supported_pipeline_classes",
]


def supported_pipeline_classes(extra: type[DiffusersFlowModel] | None = None) -> dict[str, str]:
    """Every pipeline class an adapter takes, with its ``model.kind``."""
    out = {name: kind for kind, cls in ADAPTERS.items() for name in cls.pipeline_classes}
    if extra is not None:
        out.update({name: "model.adapter" for name in extra.pipeline_classes})
    return out


def load_adapter_class(path: str) -> type[DiffusersFlowModel]:
    """The adapter class at ``package.module:Class`` (``model.adapter``)."""
    from flowdppo.plugins import resolve

    try:
        cls = resolve(path, "model.adapter")
    except ValueError as exc:
        raise PipelineInputError("model.adapter", str(exc)) from None
    if not (isinstance(cls, type) and issubclass(cls, DiffusersFlowModel)):
        raise PipelineInputError(
            "model.adapter",
            f"model.adapter: {path!r} is not a subclass of flowdppo.models.diffusers_adapters."
            "DiffusersFlowModel (docs/adding-a-model.md shows one)",
        )
    if not cls.pipeline_classes:
        raise PipelineInputError(
            "model.adapter",
            f"model.adapter: {path!r} declares no pipeline_classes; set it to the "
            "model_index.json _class_name values the adapter takes",
        )
    return cls


def check_pipeline(
    kind: str,
    path: str | Path,
    *,
    resolution: int | tuple[int, int] | None = None,
    frames: int | None = None,
    adapter: str | type[DiffusersFlowModel] | None = None,
) -> tuple[type[DiffusersFlowModel], tuple[int, int]]:
    """The adapter class for the pipeline at ``path`` and the (height, width) to use.

    Reads only ``model_index.json`` and the components' ``config.json`` files, so every
    mistake (a missing path, a pipeline class no adapter takes, an explicit ``kind`` that
    does not match the directory, a resolution or frame count the pipeline cannot take) is a
    :class:`PipelineInputError` naming the config key before any weight is read.
    """
    user = load_adapter_class(adapter) if isinstance(adapter, str) else adapter
    if user is not None and kind != "auto":
        raise PipelineInputError(
            "model.kind",
            f"model.kind {kind!r} and model.adapter both choose the adapter; set "
            "model.kind=auto with model.adapter",
        )
    if kind != "auto" and kind not in ADAPTERS:
        raise PipelineInputError(
            "model.kind",
            f"unknown model kind {kind!r}; choose auto or one of {', '.join(ADAPTERS)}",
        )
    found = _pipeline_class(kind, str(path))
    if user is not None:
        cls = user
    elif kind == "auto":
        cls = ADAPTERS.get(supported_pipeline_classes().get(found, ""))
    else:
        cls = ADAPTERS[kind]
    if cls is None or found not in cls.pipeline_classes:
        raise _wrong_pipeline(kind, cls, user, str(path), found)
    if resolution is None:
        resolution = cls.default_resolution
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    cls.check_inputs(directory_configs(path), height, width, frames)
    return cls, (height, width)


def build_diffusers_model(
    kind: str,
    path: str | Path,
    *,
    resolution: int | tuple[int, int] | None = None,
    frames: int | None = None,
    dtype: str | torch.dtype = "bfloat16",
    gradient_checkpointing: bool = False,
    device: str | torch.device | None = None,
    adapter: str | type[DiffusersFlowModel] | None = None,
    **adapter_kwargs: Any,
) -> DiffusersFlowModel:
    """Check, load and wrap the pipeline at ``path``.

    ``kind``: ``auto`` (from ``model_index.json``) or an adapter module's name.
    ``resolution``: pixels (int: square, or ``(height, width)``; None: the adapter's
    default). ``frames``: video frames (video adapters only; None: their default). ``dtype``:
    ``float32``, ``bfloat16`` or ``float16`` for every component. ``device``: default CUDA
    when available. ``adapter``: a user adapter class or its import path (with
    ``kind="auto"``). Further keywords (``max_sequence_length``, ``negative_prompt``,
    ``cache_size``, ``decode_batch_size``) go to the adapter.
    """
    torch_dtype = resolve_dtype(dtype)
    cls, size = check_pipeline(kind, path, resolution=resolution, frames=frames, adapter=adapter)

    from diffusers import DiffusionPipeline

    from flowdppo.verbosity import quiet_progress_bars

    quiet_progress_bars()  # unless --verbose: no bar per pipeline component
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), **{_dtype_keyword(): torch_dtype})
    except (OSError, ValueError) as exc:
        raise PipelineInputError(
            "model.path",
            f"could not load a diffusers pipeline from {str(path)!r}: {exc}. Point the model "
            "path at a directory written by pipeline.save_pretrained or huggingface-cli download",
        ) from exc
    kwargs = dict(adapter_kwargs)
    if cls.default_frames is not None:
        kwargs["frames"] = cls.default_frames if frames is None else frames
    return cls(
        pipe,
        resolution=size,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
        **kwargs,
    )


def _dtype_keyword() -> str:
    # diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns).
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _pipeline_class(kind: str, path: str) -> str:
    """``model_index.json``'s ``_class_name`` of the local directory ``path``."""
    p = Path(path).expanduser()
    what = "a diffusers pipeline" if kind == "auto" else f"the {kind} pipeline"
    if not p.exists():
        hub = (
            f" If {path!r} is a hub id, download it first: huggingface-cli download {path} "
            "--local-dir DIR, then set model.path=DIR."
            if path.count("/") == 1 and not path.startswith((".", "/", "~"))
            else ""
        )
        raise PipelineInputError(
            "model.path",
            f"model path {path!r} does not exist (relative paths are from the current "
            f"directory, {Path.cwd()}). Download {what} there or fix the path.{hub}",
        )
    if not (p / "model_index.json").is_file():
        raise PipelineInputError(
            "model.path",
            f"{path!r} is not a diffusers pipeline directory (no model_index.json). Point the "
            f"model path at the directory that holds {what}'s model_index.json",
        )
    index = p / "model_index.json"
    try:
        found = json.loads(index.read_text()).get("_class_name", "?")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise PipelineInputError("model.path", f"{index} is not valid JSON: {exc}") from exc
    return str(found)


def _wrong_pipeline(
    kind: str,
    cls: type[DiffusersFlowModel] | None,
    user: type[DiffusersFlowModel] | None,
    path: str,
    found: str,
) -> PipelineInputError:
    supported = supported_pipeline_classes(user)
    listing = ", ".join(f"{name} ({k})" for name, k in supported.items())
    if user is not None:
        return PipelineInputError(
            "model.adapter",
            f"{path!r} holds a {found}, but model.adapter {user.__name__} takes "
            f"{' or '.join(user.pipeline_classes)}; point at such a pipeline",
        )
    if cls is None:
        return PipelineInputError(
            "model.path",
            f"{path!r} holds a {found}, which no adapter supports. Supported pipeline classes: "
            f"{listing}. For another class, write an adapter and name it with "
            "model.adapter=package.module:Class (docs/adding-a-model.md)",
        )
    fits = supported.get(found)
    hint = f"use model kind {fits!r} or auto" if fits else "no adapter supports it"
    return PipelineInputError(
        "model.kind",
        f"{path!r} holds a {found}, but model kind {kind!r} needs "
        f"{' or '.join(cls.pipeline_classes)}: {hint}, or point at a {kind} pipeline",
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
