"""The ``log`` section: run directory, checkpoints, evaluations, reference KL, loggers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowdppo.config.base import PathKey, _Section


class LogConfig(_Section):
    run_dir: PathKey = Field(None, description="null: runs/<name>-<time>")
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(
        10, ge=0, description="iterations between evaluations and their sample grids (0: end only)"
    )
    eval_samples_per_prompt: int = Field(16, ge=1)
    eval_sde_steps: int | None = Field(
        None,
        ge=1,
        description="SDE steps per evaluation sample the KL to the reference is measured on; "
        "null: sampler.num_sde_steps (methods compared on one KL set it alike)",
    )
    eval_sde_window: tuple[float, float] | None = Field(
        None, description="the schedule window they are drawn from; null: sampler.sde_window"
    )
    eval_solver: Literal["euler", "dpm2"] | None = Field(
        None,
        description="the ODE solver of evaluations, `flowdppo eval` and `flowdppo sample --run` "
        "(DiffusionNFT trains on dpm2 rollouts but evaluates with euler); null: sampler.solver",
    )
    eval_prompts: int | None = Field(
        None,
        ge=1,
        description="evaluate on the first N trained and N held-out prompts of a built-in "
        "task (task prompts: data.eval_prompts); null: all of them",
    )
    ref_kl: bool = Field(True, description="log the KL to the reference model during training")
    ref_kl_every: int | None = Field(
        None,
        ge=1,
        description="measure it every N iterations; null: 1 for built-in tasks, 10 for "
        "diffusers models",
    )
    ref_kl_samples: int | None = Field(
        None,
        ge=1,
        description="samples per group it is measured on, drawn at random (an unbiased "
        "estimate of the batch's KL); null: the whole group for built-in tasks, 1 for "
        "diffusers models",
    )
    tensorboard: bool = True
    grid_rewards: bool = Field(True, description="print each sample's reward under it in grids")
    wandb: bool = Field(False, description="also log to Weights & Biases (the wandb extra)")
    wandb_project: str = "flowdppo"
    wandb_name: str | None = Field(None, description="wandb run name; null: the run's name")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None, description="null: wandb's own (WANDB_MODE, else online); offline: no network"
    )
