"""The policy update: replay stored transitions with gradient and apply the objective.

Replay goes through the same :meth:`SamplerSpec.step` as sampling; only the objective
function differs between Flow-DPPO, the ratio-clipping baselines and GRPO-Guard.
DiffusionNFT (:func:`nft_term_loss`) trains on noised clean samples instead, against the
old model that :class:`OldModel` keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from flowdppo import kernels
from flowdppo.models.base import FlowModel, index_cond
from flowdppo.objectives import (
    dppo_loss,
    grpo_clip_loss,
    guard_loss,
    nft_loss,
    nft_reward_weight,
    official_kl,
    reference_kl_penalty,
)
from flowdppo.trainer.rollout import ForwardCounter, Rollout, SamplerSpec


@dataclass
class ObjectiveSpec:
    """The objective's settings in the units of the log-prob reduction in use (the trainer
    resolves per-step settings into these: config.resolve_trust_region)."""

    name: str  # "dppo", "clip", "guard" or "nft"
    dppo_threshold: float | None
    clip_range: float | None
    dppo_mask: str = "asymmetric"
    clip_range_high: float | None = None
    beta: float = 0.0
    guard_clip_range: float = 2e-6
    kl_convention: str = "exact"


def _step_kl(
    out: kernels.StepOutput,
    mean_old: torch.Tensor,
    spec: SamplerSpec,
    k: int,
    convention: str,
) -> torch.Tensor:
    """The per-step KL(old || new) the mask decides on and the log reports."""
    if convention == "official":
        std = kernels.official_flow_std(spec.sigmas[k], spec.sigmas[k + 1], spec.eta, out.mean)
        return official_kl(out.mean.detach(), mean_old, std, spec.reduce)
    return kernels.gaussian_kl(out.mean.detach(), mean_old, out.std, spec.reduce)


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
    mean_old = ro.means[i, idx]
    with torch.no_grad():
        kl = _step_kl(out, mean_old, spec, k, obj.kl_convention)
    if obj.name == "dppo":
        loss, stats = dppo_loss(
            out.log_prob,
            logp_old,
            out.mean,
            mean_old,
            out.std,
            adv,
            obj.dppo_threshold,
            spec.reduce,
            obj.dppo_mask,
            kl=kl,
        )
    elif obj.name == "guard":
        dt = float(spec.sigmas[k + 1] - spec.sigmas[k])
        loss, stats = guard_loss(
            out.log_prob, logp_old, out.mean, mean_old, out.std, dt, adv, obj.guard_clip_range
        )
        stats["kl_mean"], stats["kl_max"] = kl.mean(), kl.max()
    else:
        loss, stats = grpo_clip_loss(
            out.log_prob, logp_old, adv, obj.clip_range, obj.clip_range_high
        )
        stats["kl_mean"], stats["kl_max"] = kl.mean(), kl.max()
    if obj.beta > 0:
        with torch.no_grad(), model.reference():
            v_ref = counter.velocity(model, "update_ref", x, sigma, cond, spec.guidance_scale)
            mean_ref, _ = spec.transition(k, v_ref, x)
        penalty = reference_kl_penalty(out.mean, mean_ref, out.std, obj.beta, spec.reduce)
        stats["ref_penalty"] = penalty.detach().mean()
        loss = loss + penalty
    return loss, stats


class OldModel:
    """DiffusionNFT's old model: a copy of the trainable tensors that lags the policy.

    Its velocity is the policy's network evaluated with these tensors swapped in (the
    storage is exchanged, nothing is copied); after every iteration it moves towards the
    policy, ``old <- d * old + (1 - d) * new`` (:meth:`update`).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.tensors = {
            name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad
        }

    def _params(self, module: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        named = dict(module.named_parameters())
        return [(named[name], t) for name, t in self.tensors.items()]

    @contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        pairs = self._params(module)
        with torch.no_grad():
            for p, t in pairs:
                p.data, t.data = t.data, p.data
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in pairs:
                    p.data, t.data = t.data, p.data

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float) -> None:
        for p, t in self._params(module):
            t.mul_(decay).add_(p.detach().to(t.dtype), alpha=1.0 - decay)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.tensors) - set(tensors))
        if missing:
            raise ValueError(f"the checkpoint's old model lacks {missing[:3]}")
        for name, t in self.tensors.items():
            t.copy_(tensors[name])


@dataclass
class NftPlan:
    """One iteration's DiffusionNFT training points: per sample and inner epoch, the sampler
    step indices whose noise levels it trains on."""

    steps: torch.Tensor  # [inner_epochs, B, K] indices into the sampler's sigmas

    @property
    def terms(self) -> int:
        return self.steps.shape[-1]


def nft_plan(
    batch: int, num_steps: int, fraction: float, epochs: int, generator: torch.Generator
) -> NftPlan:
    """``int(fraction * num_steps)`` (at least 1) of the sampler's noise levels per sample
    and inner epoch, in a random order of their own (as the public recipe draws them)."""
    k = max(1, int(num_steps * fraction))
    perms = [torch.randperm(num_steps, generator=generator)[:k] for _ in range(epochs * batch)]
    return NftPlan(torch.stack(perms).view(epochs, batch, k))


def nft_term_loss(
    model: FlowModel,
    ro: Rollout,
    idx: torch.Tensor,
    step_index: torch.Tensor,
    advantages: torch.Tensor,
    spec: SamplerSpec,
    cfg,
    old: OldModel,
    generator: torch.Generator,
    counter: ForwardCounter,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's per-sample loss at one noise level per sample (``step_index``, [b]):
    the clean sample noised afresh, the old and the current velocity there, and the recipe's
    velocity distance to the reference model (``cfg`` is the config's nft section)."""
    x0 = ro.final[idx].float()
    cond = index_cond(ro.cond, idx)
    sigma = spec.sigmas[step_index].to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - s) * x0 + s * noise
    with torch.no_grad(), old.swapped_in(model.module):
        v_old = counter.velocity(model, "update_old", x_t, sigma, cond, spec.guidance_scale)
    v = counter.velocity(model, "update", x_t, sigma, cond, spec.guidance_scale)
    weight = nft_reward_weight(advantages[idx], cfg.adv_clip)
    loss, stats = nft_loss(v, v_old, x_t, x0, sigma, weight, cfg.beta, cfg.adaptive_floor)
    loss = loss * cfg.loss_scale
    if cfg.ref_beta > 0:
        with torch.no_grad(), model.reference():
            v_ref = counter.velocity(model, "update_ref", x_t, sigma, cond, spec.guidance_scale)
        dims = tuple(range(1, x0.dim()))
        penalty = cfg.ref_beta * ((v.float() - v_ref.float()) ** 2).mean(dim=dims)
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
