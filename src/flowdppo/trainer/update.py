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
from flowdppo.trainer.rollout import ForwardCounter, Rollout, SamplerSpec, replay_velocities
from flowdppo.trainer.sharding import copy_full, is_sharded


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
    return steps_loss(model, ro, idx, [i], advantages, spec, obj, counter)[0]


def steps_loss(
    model: FlowModel,
    ro: Rollout,
    idx: torch.Tensor,
    steps: list[int],
    advantages: torch.Tensor,
    spec: SamplerSpec,
    obj: ObjectiveSpec,
    counter: ForwardCounter,
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """:func:`step_loss` of each recorded step in ``steps``, from one forward over all of
    their rows (``train.fuse_steps``; one more under the reference with ``beta``)."""
    velocities = replay_velocities(model, ro, steps, idx, spec, counter, "update")
    references: list[torch.Tensor | None] = [None] * len(steps)
    if obj.beta > 0:
        with torch.no_grad(), model.reference():
            references = replay_velocities(model, ro, steps, idx, spec, counter, "update_ref")
    return [
        _objective(ro, idx, i, v, v_ref, advantages, spec, obj)
        for i, v, v_ref in zip(steps, velocities, references, strict=True)
    ]


def _objective(
    ro: Rollout,
    idx: torch.Tensor,
    i: int,
    v: torch.Tensor,
    v_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    spec: SamplerSpec,
    obj: ObjectiveSpec,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # Step i's transition replayed with the policy's velocity v (the reference's v_ref).
    k = ro.sde_steps[i]
    x = ro.states[i, idx]
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
    if v_ref is not None:
        with torch.no_grad():
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
        _exchange(pairs)
        try:
            yield
        finally:
            _exchange(pairs)

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
            copy_full(t, tensors[name])


@torch.no_grad()
def _exchange(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    for p, t in pairs:
        if is_sharded(p):
            # FSDP gathers a sharded parameter from storage of its own, which a swap of
            # ``.data`` would not reach: exchange the values in place instead.
            held = p.detach().clone()
            p.copy_(t)
            t.copy_(held)
        else:
            p.data, t.data = t.data, p.data


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
    noise: torch.Tensor,
    counter: ForwardCounter,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's per-sample loss at one noise level per sample (``step_index``, [b]):
    the clean sample noised afresh with ``noise`` (the trainer draws it for the whole
    minibatch, so a split into micro-batches or processes trains on the same points), the
    old and the current velocity there, and the recipe's velocity distance to the reference
    model (``cfg`` is the config's nft section)."""
    x0 = ro.final[idx].float()
    cond = index_cond(ro.cond, idx)
    sigma = spec.sigmas[step_index].to(x0.device)
    noise = noise.to(x0.device)
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


class UpdateStats:
    """The statistics of one update phase, combined once, the same way for 1 or N processes.

    Every objective call reports statistics over the samples it scored: means, fractions,
    ``*_std`` (population std), ``*_min`` and ``*_max``. A *unit* is one trained step of one
    minibatch; its samples may be scored by several calls (micro-batches, processes). Within
    a unit the calls are combined exactly (:func:`combine_stats`: count-weighted means, the
    parallel-variance formula for stds), so splitting a minibatch changes nothing but float
    rounding; over units, values are weighted by the samples each unit scored, and extremes
    are kept. The running tensors stay on their device until :meth:`result`, the phase's one
    host read.
    """

    def __init__(self) -> None:
        self.units: list[int] = []
        self.counts: list[int] = []
        self.rows: list[dict[str, torch.Tensor | float]] = []
        self.optimizer: dict[str, list[torch.Tensor]] = {}

    def add(self, unit: int, count: int, stats: dict[str, torch.Tensor | float]) -> None:
        """One call's statistics over ``count`` samples of ``unit`` (0: a stand-in call)."""
        self.units.append(unit)
        self.counts.append(count)
        self.rows.append(stats)

    def add_step(self, key: str, value: torch.Tensor) -> None:
        """A value per optimizer step (e.g. the gradient norm), averaged over the steps."""
        self.optimizer.setdefault(key, []).append(_scalar(value))

    def result(self, gather=None, first_units: int = 0) -> dict[str, float]:
        """The phase's statistics. ``gather`` ([P, ...] -> [W, P, ...]) joins every process's
        table (all processes made the same calls); ``first_units`` of the first minibatch
        give ``first_update_ratio_dev``, how far the first replay's ratio is from 1."""
        out = {k: float(torch.stack(v).mean()) for k, v in self.optimizer.items()}
        if not self.rows:
            return out
        keys = list(self.rows[0])
        values = torch.stack([torch.stack([_scalar(r[k]) for k in keys]) for r in self.rows])
        counts = torch.tensor(self.counts, dtype=torch.float64)
        table = torch.cat([counts[:, None], values.cpu()], dim=1)[None]  # the host read
        if gather is not None:
            table = gather(table)
        table = table.transpose(0, 1)  # [calls, W, 1 + keys]
        units = torch.tensor(self.units)
        per_unit = []
        for u in units.unique().tolist():
            rows = table[units == u].reshape(-1, table.shape[-1])
            n = float(rows[:, 0].sum())
            per_unit.append((u, n, combine_stats(rows[:, 0], rows[:, 1:], keys)))
        total = sum(n for _, n, _ in per_unit)
        for key in keys:
            got = [s[key] for _, n, s in per_unit if n > 0]
            if key.endswith("_min"):
                out[key] = min(got)
            elif key.endswith("_max"):
                out[key] = max(got)
            else:
                out[key] = sum(n * s[key] for _, n, s in per_unit if n > 0) / total
        first = [s for u, n, s in per_unit if u < first_units and n > 0]
        if first and "ratio_max" in keys:  # DiffusionNFT has no ratio
            out["first_update_ratio_dev"] = max(
                max(abs(s["ratio_max"] - 1), abs(s["ratio_min"] - 1)) for s in first
            )
        return out


def combine_stats(counts: torch.Tensor, values: torch.Tensor, keys: list[str]) -> dict:
    """Statistics of several calls over parts of one sample set -> the set's statistics.

    ``counts`` [C] samples each call scored, ``values`` [C, len(keys)]. Means and fractions
    are count-weighted, ``*_min`` / ``*_max`` take the extreme over calls that scored
    something, and ``*_std`` (population std) is recombined with its ``*_mean`` by the
    parallel-variance formula.
    """
    n = counts.double()
    live = n > 0
    total = n.sum()
    # A stand-in call (count 0) may hold anything, NaN included: it must not reach a sum.
    v = torch.where(live[:, None], values.double(), torch.zeros((), dtype=torch.float64))
    out: dict[str, float] = {}
    index = {k: j for j, k in enumerate(keys)}
    for j, key in enumerate(keys):
        col = v[:, j]
        if key.endswith("_min"):
            out[key] = float(values[live, j].double().min())
        elif key.endswith("_max"):
            out[key] = float(values[live, j].double().max())
        elif not key.endswith("_std"):
            out[key] = float((n * col).sum() / total)
    for j, key in enumerate(keys):
        if key.endswith("_std"):
            mean_key = key[: -len("_std")] + "_mean"
            if mean_key not in index:
                raise ValueError(f"statistic {key!r} comes without {mean_key!r}")
            means = v[:, index[mean_key]]
            mean = (n * means).sum() / total
            var = (n * (v[:, j] ** 2 + (means - mean) ** 2)).sum() / total
            out[key] = float(var.clamp_min(0).sqrt())
    return out


def _scalar(value: torch.Tensor | float) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).double()
    return torch.tensor(float(value), dtype=torch.float64)
