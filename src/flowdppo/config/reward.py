"""The ``reward`` section: which rewards, their weights (constant or warmed up) and options."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from flowdppo.config.base import _Section


class WeightSchedule(_Section):
    """A reward's weight that ramps linearly from ``start`` to ``value`` over the first
    ``warmup_iterations`` iterations, then stays at ``value``."""

    value: float = Field(description="the weight after the warm-up")
    warmup_iterations: int = Field(ge=1, description="iterations the ramp lasts")
    start: float = Field(0.0, description="the weight at iteration 0")

    def at(self, iteration: int) -> float:
        frac = min(1.0, iteration / self.warmup_iterations)
        return self.start + (self.value - self.start) * frac


class RewardConfig(_Section):
    names: list[str] = Field(
        default_factory=list,
        description="registered names or package.module:function import paths of reward "
        "factories; empty: the task's default",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="modules imported before the run starts (they register rewards, tasks or "
        "model adapters); recorded, so resume, eval and sample import them too",
    )
    weights: dict[str, float | WeightSchedule] = Field(
        default_factory=dict,
        description="per reward: a constant weight, or {value, warmup_iterations, start} for "
        "a linear warm-up; unnamed rewards weigh 1",
    )
    concurrent: bool = Field(
        True,
        description="score a batch with all rewards at once, each in its own thread (false: "
        "one after the other, for rewards that are not thread-safe)",
    )
    timeout_s: float | None = Field(
        3600.0,
        gt=0,
        description="seconds one reward call may take before the run stops naming it (a hung "
        "reward); null: no limit",
    )
    combine: Literal["weighted", "gdpo"] = "weighted"
    adv_std: Literal["global", "group"] = "global"
    adv_clip: float | None = Field(None, gt=0)
    adv_eps: float = Field(
        1e-8,
        gt=0,
        description="added to the advantage's std, (R - mean) / (std + adv_eps); Flow-GRPO "
        "and DiffusionNFT add 1e-4 (flow_grpo/stat_tracking.py)",
    )
    max_invalid_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="samples with a NaN/inf reward are excluded; abort above this fraction",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="keyword options per reward, {name: {key: value}} (e.g. a model path)",
    )

    @field_validator("names", "plugins", mode="before")
    @classmethod
    def _one_or_comma_separated(cls, v: Any) -> Any:
        # reward.names=digit_prob on a command line is a string, not a one-item list:
        # read a string as comma-separated names (an import path holds no comma).
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        # One plain message per weight, instead of one per branch of the union.
        if not isinstance(v, dict):
            return v
        form = "a number or a warm-up {value: W, warmup_iterations: N, start: W0 (default 0)}"
        out: dict[str, Any] = {}
        for name, w in v.items():
            if isinstance(w, dict):
                keys = set(WeightSchedule.model_fields)
                if set(w) - keys or not {"value", "warmup_iterations"} <= set(w):
                    raise ValueError(f"{name!r}: {w} is not {form}")
                try:
                    out[name] = WeightSchedule(**w)
                except ValidationError as exc:
                    problems = "; ".join(
                        f"{'.'.join(map(str, e['loc']))} {e['msg'].lower()}" for e in exc.errors()
                    )
                    raise ValueError(f"{name!r}: {problems}") from None
            elif isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w):
                out[name] = w
            else:
                raise ValueError(f"{name!r}: {w!r} is not {form}")
        return out

    @model_validator(mode="after")
    def _options_name_rewards(self) -> RewardConfig:
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"names lists {dup} more than once")
        unknown = sorted(set(self.options) - set(self.names)) if self.names else []
        if unknown:
            raise ValueError(f"options names {unknown}, which are not in reward.names {self.names}")
        return self


def reward_weights(cfg: RewardConfig, iteration: int) -> dict[str, float]:
    """Every weighted reward's weight at ``iteration`` (0-based)."""
    return {
        name: w.at(iteration) if isinstance(w, WeightSchedule) else float(w)
        for name, w in cfg.weights.items()
    }
