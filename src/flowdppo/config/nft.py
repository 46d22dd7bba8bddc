"""The ``nft`` section: DiffusionNFT's options (read by algorithm nft only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowdppo.config.base import _Section


class NftConfig(_Section):
    """DiffusionNFT's knobs, at the values of its public SD3.5-M recipe (NVlabs/DiffusionNFT,
    config/base.py and config/nft.py; scripts/train_nft_sd3.py for the update rule)."""

    # config/nft.py: config.beta = 1.0 (the GenEval and PickScore recipes; 0.1 for OCR).
    beta: float = Field(1.0, gt=0, description="mixing coefficient of the implicit policies")
    # config/base.py: train.adv_clip_max = 5; the weight is clip(A, -5, 5) / 10 + 1/2.
    adv_clip: float = Field(
        5.0, gt=0, description="advantages clipped to +-adv_clip, then mapped onto [0, 1]"
    )
    # config/base.py: train.timestep_fraction = 0.99: int(0.99 N) of the sampler's N noise
    # levels, drawn per sample and inner epoch.
    timestep_fraction: float = Field(
        0.99, gt=0, le=1, description="fraction of the sampler's noise levels trained on"
    )
    # scripts/train_nft_sd3.py, return_decay with config.decay_type = 1 (GenEval, PickScore):
    # after every iteration old <- d * old + (1 - d) * new, d = min(rate * (step - start),
    # max) from optimizer step `start` on (0 before).
    decay_start: int = Field(0, ge=0, description="optimizer steps before the old model lags")
    decay_rate: float = Field(0.001, ge=0, description="old-model decay gained per optimizer step")
    decay_max: float = Field(0.5, ge=0, lt=1, description="largest old-model decay")
    # scripts/train_nft_sd3.py samples every rollout with the "old" adapter (set_adapter("old")
    # around pipeline_with_logprob); "current" samples with the policy being trained.
    rollout_model: Literal["current", "old"] = Field(
        "current",
        description="the weights that sample the rollouts: current (the policy) or old (the "
        "lagging old model, as the official trainer does)",
    )
    # config/base.py: train.beta = 0.0001, on mean((v - v_ref)^2).
    ref_beta: float = Field(
        1e-4, ge=0, description="weight of the velocity distance to the reference model"
    )
    # scripts/train_nft_sd3.py: the adaptive weight's floor, clip(min=0.00001).
    adaptive_floor: float = Field(1e-5, gt=0, description="floor of the adaptive x0 weight")
    # scripts/train_nft_sd3.py: policy_loss = (...) * config.train.adv_clip_max.
    loss_scale: float = Field(5.0, gt=0, description="constant factor on the policy loss")

    def decay(self, optimizer_steps: int) -> float:
        """The old model's decay after ``optimizer_steps`` optimizer steps."""
        if optimizer_steps < self.decay_start:
            return 0.0
        return min(self.decay_rate * (optimizer_steps - self.decay_start), self.decay_max)
