"""Trust-region arithmetic: each value in its per-element and per-step form, and defaults."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from flowdppo.config.base import ConfigError
from flowdppo.config.objective import _TRUST, ObjectiveConfig
from flowdppo.units import kl_inline

if TYPE_CHECKING:
    from flowdppo.config.run import Config


# Flow-GRPO's published CPS recipe (config/grpo.py, the SD3.5-M CPS configs): noise level
# 0.8, the unnormalised score -(x' - mean)^2 and clip range 1e-5 on it, at 512 px
# (d = 65,536): the defaults of ratio clipping with the CPS kernel, the clip range held in
# "nats" per step like every trust region (docs/method.md, "Conventions" and "Units").
CPS_RECIPE = {"eta": 0.8, "score": "cps"}
CPS_CLIP_RANGE_PER_STEP = 65536 * 1e-5
# The paper's Flow-DPPO threshold with the CPS kernel, delta = 1e-6 for SD3.5-M at 512 px
# (configs/sd3/dppo_cps.yaml), held in nats per step: the default of dppo+cps.
DPPO_CPS_THRESHOLD_PER_STEP = 65536 * 1e-6


# Trust-region keys whose value has a per-element and a per-step form, with the per-step
# default (None: no default, the key stays unset).
TRUST_REGION_KEYS = {
    "dppo_threshold": 65536 * 1e-7,
    "clip_range": 65536 * 1e-4,
    "clip_range_high": None,
}


def per_step_factor(latent_elements: int, log_prob_reduce: str) -> int:
    """Nats per step of one unit of a per-element threshold: d for element-mean log-probs,
    1 for summed ones (a summed KL already is per step)."""
    return latent_elements if log_prob_reduce == "mean" else 1


def check_trust_region_forms(obj: ObjectiveConfig, log_prob_reduce: str) -> None:
    """Each trust-region value is given in one form; a run's own config.yaml records both,
    with the latent size that makes them agree."""
    for key in TRUST_REGION_KEYS:
        elem, step = getattr(obj, key), getattr(obj, f"{key}_per_step")
        if elem is None or step is None:
            continue
        d = obj.latent_elements
        if d is None:
            raise ValueError(
                f"objective.{key} and objective.{key}_per_step are both set: set one of them "
                f"(per step = d x per element, d the latent elements per sample)"
            )
        expected = elem * per_step_factor(d, log_prob_reduce)
        if not math.isclose(step, expected, rel_tol=1e-9):
            raise ValueError(
                f"objective.{key} = {elem:g} and objective.{key}_per_step = {step:g} disagree "
                f"for objective.latent_elements = {d} (expected {expected:g} per step): set "
                f"one of them and drop the other"
            )


def resolve_trust_region(cfg: Config, latent_elements: int) -> Config:
    """``cfg`` with every trust-region value in both forms, for a model whose samples have
    ``latent_elements`` latent elements (a ConfigError if the config was resolved for
    another size)."""
    obj = cfg.objective
    if cfg.objective_name not in _TRUST:
        return cfg  # guard and nft have no per-element / per-step pair
    if obj.latent_elements is not None and obj.latent_elements != latent_elements:
        raise ConfigError(
            f"objective.latent_elements is {obj.latent_elements}, but this model's samples "
            f"have {latent_elements} latent elements: the run was set up for another model "
            f"or resolution; drop objective.latent_elements (and one form of each threshold)"
        )
    factor = per_step_factor(latent_elements, cfg.sampler.log_prob_reduce)
    values: dict[str, Any] = {"latent_elements": latent_elements}
    defaults = dict(TRUST_REGION_KEYS)
    if cfg.kernel == "cps" and cfg.sampler.score == "cps":
        defaults["clip_range"] = CPS_CLIP_RANGE_PER_STEP
    if cfg.kernel == "cps" and cfg.objective_name == "dppo":
        defaults["dppo_threshold"] = DPPO_CPS_THRESHOLD_PER_STEP
    for key, default_per_step in defaults.items():
        elem, step = getattr(obj, key), getattr(obj, f"{key}_per_step")
        if elem is None and step is None:
            step = default_per_step
        if step is None:
            step = None if elem is None else elem * factor
        elif elem is None:
            elem = step / factor
        values[key], values[f"{key}_per_step"] = elem, step
    return cfg.model_copy(update={"objective": obj.model_copy(update=values)})


def describe_trust_region(cfg: Config) -> str:
    """One line: the trust region of a resolved config in both forms."""
    o = cfg.objective
    if cfg.objective_name == "guard":
        return f"GRPO-Guard clip range {o.guard_clip_range:.4g} on the normalised log-ratio"
    if cfg.objective_name == "nft":
        return f"DiffusionNFT beta {cfg.nft.beta:g}: no trust region on the policy"
    if o.latent_elements is None:
        raise ValueError("describe_trust_region needs a resolved config (resolve_trust_region)")
    d = o.latent_elements
    mean = cfg.sampler.log_prob_reduce == "mean"
    if cfg.objective_name == "dppo":
        # A KL, so in the unit every KL to the reference is shown in (flowdppo.units).
        head = (
            f"Flow-DPPO threshold on KL(old || new): {kl_inline(o.dppo_threshold)}, the unit "
            "of every KL shown (per SDE step, "
        )
        if not mean:
            return head + f"log-probs summed over the d = {d} latent elements)"
        return head + (
            f"mean over the d = {d} latent elements; {o.dppo_threshold_per_step:.4g} nats "
            "summed over them)"
        )
    unit = "per element" if mean else "(summed log-probs)"
    head = f"clip range {o.clip_range:.4g} {unit} = {o.clip_range_per_step:.4g}"
    if o.clip_range_high is not None:
        head += f" (high {o.clip_range_high:.4g} = {o.clip_range_high_per_step:.4g})"
    return f"{head} nats per step (d = {d} latent elements)"
