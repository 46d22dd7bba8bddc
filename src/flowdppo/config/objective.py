"""The ``objective`` section, and which objectives read each of its options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowdppo.config.algorithm import parse_algorithm
from flowdppo.config.base import _Section


class ObjectiveConfig(_Section):
    # A trust region is given in one of two forms (docs/method.md, "Units"): per element of
    # the log-prob reduction in use (the published form; with element-mean log-probs its
    # meaning in nats scales with the latent size d), or per SDE step, in nats summed over
    # the latent, which carries from one model and resolution to another. Unset, the run
    # uses the per-step defaults of TRUST_REGION_KEYS: the paper's SD3.5-M settings
    # (delta = 1e-7 and epsilon = 1e-4 per element at d = 65,536) held in nats per step.
    dppo_threshold: float | None = Field(
        None, gt=0, description="Flow-DPPO trust-region KL per element of log_prob_reduce"
    )
    dppo_threshold_per_step: float | None = Field(
        None, gt=0, description="the same threshold in nats per SDE step (d x the per-element)"
    )
    dppo_mask: Literal["asymmetric", "kl", "first_order"] = "asymmetric"
    clip_range: float | None = Field(
        None, gt=0, description="ratio clip for grpo/cps, per element of log_prob_reduce"
    )
    clip_range_per_step: float | None = Field(
        None, gt=0, description="the same clip range as a log-ratio window in nats per step"
    )
    clip_range_high: float | None = Field(None, gt=0)
    clip_range_high_per_step: float | None = Field(None, gt=0)
    latent_elements: int | None = Field(
        None,
        ge=1,
        description="latent elements per sample (d) that relate the two forms; the run "
        "fills it in from the model and checks it on resume",
    )
    beta: float = Field(0.0, ge=0, description="weight of the exact KL to the reference model")
    # GRPO-Guard's clip range on its normalised log-ratio std * (log r + D) (element-mean,
    # docs/method.md). 2e-6 is train.clip_range of the released GRPO-Guard recipes for OCR
    # and GenEval (yifan123/flow_grpo config/grpo_guard.py, commit 9745241; PickScore: 4e-6).
    guard_clip_range: float = Field(
        2e-6, gt=0, description="guard: clip range of the normalised ratio (element mean)"
    )
    kl_convention: Literal["exact", "official"] = Field(
        "exact",
        description="exact: the exact per-step KL; official: the official Flow-DPPO code's "
        "(sigma clamped at 0.99 in its std, bf16 old means, the Flow-SDE std with any kernel)",
    )


# The objectives that read each objective option; any other objective refuses it (set to
# a value other than its default). The Flow-DPPO and ratio-clipping trust regions are
# resolved and recorded for both of those objectives, so one experiment config drives both.
_TRUST = ("dppo", "clip")
OBJECTIVE_OPTION_OWNERS = {
    "dppo_threshold": _TRUST,
    "dppo_threshold_per_step": _TRUST,
    "dppo_mask": ("dppo",),
    "clip_range": _TRUST,
    "clip_range_per_step": _TRUST,
    "clip_range_high": _TRUST,
    "clip_range_high_per_step": _TRUST,
    "latent_elements": _TRUST,
    "beta": ("dppo", "clip", "guard"),
    "guard_clip_range": ("guard",),
    "kl_convention": ("dppo", "clip", "guard"),
}


def drop_foreign_options(tree: dict) -> dict:
    """``tree`` without the objective options its algorithm does not read (an experiment's
    shared settings hold every method's knobs; each run keeps its own)."""
    objective = parse_algorithm(str(tree.get("algorithm", "dppo")))[0]
    section = tree.get("objective")
    out = dict(tree)
    if isinstance(section, dict):
        out["objective"] = {
            k: v
            for k, v in section.items()
            if k not in OBJECTIVE_OPTION_OWNERS or objective in OBJECTIVE_OPTION_OWNERS[k]
        }
    if objective != "nft":
        out.pop("nft", None)
    elif isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k != "trained_steps"}
    return out
