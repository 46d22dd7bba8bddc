"""Load a trained run back: its config (for a resume, with a longer budget), task and model
with the latest checkpoint (the EMA weights when the run kept them)."""

from __future__ import annotations

from pathlib import Path

import torch

from flowdppo.config import (
    Config,
    ConfigError,
    config_from_dict,
    parse_overrides,
    read_yaml,
)
from flowdppo.models.base import FlowModel
from flowdppo.models.finetune import apply_finetuning
from flowdppo.plugins import load_user_code
from flowdppo.tasks import Task, task_for_config
from flowdppo.trainer import checkpoint as ckpt

#: The keys ``flowdppo train --resume RUN key=value`` may change.
RESUMABLE_KEYS = ("train.iterations",)


def run_config(run_dir: str | Path) -> Config:
    """A run directory's own config.yaml, validated."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return config_from_dict(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config a resume runs with: the run's own, with a longer ``train.iterations`` if
    ``overrides`` asks for one; any other key is refused."""
    cfg = run_config(run_dir)
    tree = parse_overrides(overrides)
    changed = _dotted_keys(tree)
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        raise ConfigError(
            f"--resume continues a run with its own config.yaml: {refused[0]} cannot change on "
            f"resume; the only key that can is train.iterations (a longer budget, e.g. "
            f"train.iterations={cfg.train.iterations * 2}). Start a new run for other settings"
        )
    if not changed:
        return cfg
    own = cfg.train.iterations
    new = config_from_dict(
        {
            **cfg.model_dump(mode="json"),
            "train": {**cfg.train.model_dump(mode="json"), **tree["train"]},
        },
        source=f"override {overrides[-1]}",
    ).train.iterations
    if new < own:
        raise ConfigError(
            f"override train.iterations={new} is less than the run's own budget of {own}: a "
            "resume can only continue a run further"
        )
    # The trainer records the continuation in config.yaml once it holds the run's lock.
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"iterations": new})})


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += _dotted_keys(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def load_run(run_dir: str | Path, raw_weights: bool = False) -> tuple[Config, Task, FlowModel, int]:
    """(config, task, model with trained weights, iteration of the checkpoint).

    The weights are the run's EMA when it kept one (``train.ema``), unless ``raw_weights``.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    load_user_code(cfg.reward)  # the run's own plugins may define its task or model
    task = task_for_config(cfg)
    model = task.build_model(cfg.model.weights)
    model.forward_batch_size = cfg.model.forward_batch_size
    apply_finetuning(
        model,
        cfg.model.finetune,
        rank=cfg.model.lora_rank,
        alpha=cfg.model.lora_alpha,
        targets=cfg.model.lora_targets or task.extra.get("lora_targets"),
    )
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise ckpt.CheckpointError(f"run {run_dir} has no checkpoint yet")
    payload, state, _, _ = ckpt.load_checkpoint(path)
    average = None if raw_weights else ckpt.load_ema(path)
    if average is not None:
        state = average
    params = dict(model.module.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise ckpt.CheckpointError(
            f"checkpoint {path} has tensors the model lacks: {sorted(missing)[:3]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    model.module.eval()
    return cfg, task, model, payload["iteration"]
