"""Load a trained run back: its config, task and model with the latest checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from flowdppo.config import Config, ConfigError, config_from_dict, read_yaml
from flowdppo.models.base import FlowModel
from flowdppo.models.finetune import apply_finetuning
from flowdppo.plugins import load_user_code
from flowdppo.tasks import Task, task_for_config
from flowdppo.trainer import checkpoint as ckpt


def load_run(run_dir: str | Path) -> tuple[Config, Task, FlowModel, int]:
    """(config, task, model with trained weights, iteration of the checkpoint)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (it has no config.yaml)")
    cfg = config_from_dict(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
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
    params = dict(model.module.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise ckpt.CheckpointError(
            f"checkpoint {path} has tensors the model lacks: {sorted(missing)[:3]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    model.module.eval()
    return cfg, task, model, payload["iteration"]
