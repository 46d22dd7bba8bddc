"""The policy update: replay stored transitions with gradient and apply the objective.

Replay goes through the same :meth:`SamplerSpec.step` as sampling; only the objective
function differs between Flow-DPPO and the ratio-clipping baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowdppo import kernels
from flowdppo.models.base import FlowModel, index_cond
from flowdppo.objectives import dppo_loss, grpo_clip_loss, reference_kl_penalty
from flowdppo.trainer.rollout import ForwardCounter, Rollout, SamplerSpec


@dataclass
class ObjectiveSpec:
    """The objective's settings in the units of the log-prob reduction in use (the trainer
    resolves per-step settings into these: config.resolve_trust_region)."""

    name: str  # "dppo" or "clip"
    dppo_threshold: float
    clip_range: float
    dppo_mask: str = "asymmetric"
    clip_range_high: float | None = None
    beta: float = 0.0


def step_loss(
    model: FlowModel,
    ro: Rollout,
    idx: torch.Tensor,
    i: int,
    advantages: torch.Tensor,
    spec: SamplerSpec,
    obj: ObjectiveSpec,
    counter: ForwardCounter,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Element-wise loss of SDE step ``i`` for the samples ``idx``, with its statistics."""
    k = ro.sde_steps[i]
    x = ro.states[i, idx]
    cond = index_cond(ro.cond, idx)
    sigma = spec.sigmas[k].expand(x.shape[0])
    v = counter.velocity(model, "update", x, sigma, cond, spec.guidance_scale)
    out = spec.step(k, spec.kernel, v, x, prev_sample=ro.next_states[i, idx])
    adv = advantages[idx]
    logp_old = ro.log_probs[i, idx]
    if obj.name == "dppo":
        loss, stats = dppo_loss(
            out.log_prob,
            logp_old,
            out.mean,
            ro.means[i, idx],
            out.std,
            adv,
            obj.dppo_threshold,
            spec.reduce,
            obj.dppo_mask,
        )
    else:
        loss, stats = grpo_clip_loss(
            out.log_prob, logp_old, adv, obj.clip_range, obj.clip_range_high
        )
        with torch.no_grad():
            kl = kernels.gaussian_kl(out.mean, ro.means[i, idx], out.std, spec.reduce)
            stats["kl_mean"], stats["kl_max"] = kl.mean(), kl.max()
    if obj.beta > 0:
        with torch.no_grad(), model.reference():
            v_ref = counter.velocity(model, "update_ref", x, sigma, cond, spec.guidance_scale)
            mean_ref, _ = spec.transition(k, v_ref, x)
        penalty = reference_kl_penalty(out.mean, mean_ref, out.std, obj.beta, spec.reduce)
        stats["ref_penalty"] = penalty.detach().mean()
        loss = loss + penalty
    return loss, stats


class StatsAccumulator:
    """Averages per-call statistics over an update phase; keeps min / max where named.

    The running sums stay tensors on the device they come from: adding a call's statistics
    never waits for the GPU, and :meth:`result` reads them all back in one transfer.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.extremes: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor | float], weight: int = 1) -> None:
        """One call's statistics; ``weight``: the samples they are means over (a call over
        a micro-batch counts for its share of the minibatch)."""
        for key, value in stats.items():
            if key.endswith("_min"):
                self.keep(key, value, torch.minimum)
            elif key.endswith("_max"):
                self.keep(key, value, torch.maximum)
            else:
                v = _scalar(value) * weight
                self.sums[key] = self.sums[key] + v if key in self.sums else v
                self.counts[key] = self.counts.get(key, 0) + weight

    def keep(self, key: str, value: torch.Tensor | float, pick=torch.maximum) -> None:
        """Keep the extreme (``pick``: torch.maximum or torch.minimum) of ``value`` seen."""
        v = _scalar(value)
        self.extremes[key] = pick(self.extremes[key], v) if key in self.extremes else v

    def result(self) -> dict[str, float]:
        keys = list(self.sums) + list(self.extremes)
        if not keys:
            return {}
        values = [self.sums[k] / self.counts[k] for k in self.sums] + list(self.extremes.values())
        device = values[0].device
        # The phase's one host read.
        return dict(zip(keys, torch.stack([v.to(device) for v in values]).tolist()))


def _scalar(value: torch.Tensor | float) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).double()
    return torch.tensor(float(value), dtype=torch.float64)
