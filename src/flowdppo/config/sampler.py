"""The ``sampler`` section: steps, noise level, where the SDE steps are drawn and the ODE
solver of the other steps."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from flowdppo.config.base import _Section


class SamplerConfig(_Section):
    num_steps: int = Field(10, ge=1, description="denoising steps per sample")
    eta: float = Field(0.7, ge=0, description="noise level of the SDE kernel")
    num_sde_steps: int = Field(3, ge=1, description="exploration (SDE) steps per trajectory")
    sde_window: tuple[float, float] = Field(
        (0.0, 0.5), description="fraction window of the schedule the SDE steps are drawn from"
    )
    shift: float | None = Field(None, gt=0, description="time shift; null: the model's own")
    guidance_scale: float = Field(1.0, ge=1.0, description="classifier-free guidance (1: off)")
    guidance_scale_2: float | None = Field(
        None,
        ge=1.0,
        description="two-expert Wan 2.2: the low-noise expert's guidance; null: guidance_scale",
    )
    log_prob_reduce: Literal["mean", "sum"] = "mean"
    score: Literal["gaussian", "cps"] = Field(
        "gaussian", description="cps: the CPS authors' unnormalised -(x' - mean)^2 score"
    )
    solver: Literal["euler", "dpm2"] = Field(
        "euler",
        description="ODE solver of the deterministic steps (rollouts' non-SDE steps, "
        "evaluation, flowdppo sample / eval): euler, or dpm2, the second-order multistep "
        "DPM-Solver++ of DiffusionNFT's trainer (first-order on the first step, after each "
        "SDE step and on the step to sigma 0); SDE steps keep their kernel",
    )
    ode_stride: int = Field(
        1,
        ge=1,
        description="training rollouts only: each stretch of deterministic steps lands on "
        "every ode_stride-th level of the schedule (and on the stretch's end), so a stretch "
        "of m steps costs ceil(m / ode_stride) forwards; SDE steps keep their levels, so "
        "log-probs and KL are unchanged in meaning; pair with solver dpm2. 1: every level. "
        "Evaluation, reference KL and flowdppo sample / eval use every level",
    )
    shared_prefix: bool = Field(
        False,
        description="training rollouts only: the members of a group start from one noise "
        "draw and share their deterministic steps up to the first SDE step (computed once "
        "per group) and branch at its noise; members then differ only after the branch",
    )
    merge_lora: bool = Field(
        False,
        description="rollouts and evaluation sampling run with the LoRA adapters folded into "
        "the base weights (W + scaling B A, restored exactly after): fewer products per "
        "forward, the same function up to float rounding (the first replay's ratio is 1 to "
        "about 1e-6, not exactly); reference KL and update keep the adapters. Diffusers "
        "models in float32 only; no effect with full fine-tuning (no adapters) or FSDP "
        "(sharded weights are not folded)",
    )

    @field_validator("sde_window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        return v


def sde_window_bounds(num_steps: int, window: tuple[float, float]) -> tuple[int, int]:
    """``(first, stop)``: the steps ``k`` with ``lo <= k / num_steps < hi``.

    Found from ``lo * n`` and ``hi * n`` and then checked with the same division the
    sampler uses, so validating a config costs the same for 10 steps as for 10**20 (a
    list of every step would not fit in memory for a huge value)."""
    lo, hi = window

    def first_at_or_above(threshold: float) -> int:
        k = max(0, min(num_steps, math.floor(threshold * num_steps) - 2))
        while k < num_steps and k / num_steps < threshold:
            k += 1
        return k

    return first_at_or_above(lo), first_at_or_above(hi)
