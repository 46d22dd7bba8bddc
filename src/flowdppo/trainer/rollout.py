"""Rollouts: sample trajectories and record what the update needs to replay them.

For every exploration (SDE) step the rollout keeps the state, the sampled next state, the
old log-prob and the old mean. Flow-DPPO's KL anchor is that stored mean, so it costs no
forward pass beyond what sampling already did.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from flowdppo import kernels, schedule, solvers
from flowdppo.models.base import Cond, FlowModel, cat_cond, index_cond
from flowdppo.models.finetune import lora_folded
from flowdppo.trainer.faults import fault_point
from flowdppo.trainer.watchdog import mark


@dataclass
class SamplerSpec:
    """How one trajectory is sampled (the config's sampler section, resolved)."""

    kernel: str
    sigmas: torch.Tensor  # [N + 1], from 1 down to 0
    eta: float
    guidance_scale: float = 1.0
    reduce: str = "mean"
    score: str = "gaussian"
    solver: str = "euler"  # the deterministic steps' ODE solver (flowdppo.solvers)
    # Deterministic stretches step over every ode_stride-th level (schedule.step_plan).
    ode_stride: int = 1
    # Sample with the LoRA adapters folded into the base weights (models.finetune.lora_folded).
    merge_lora: bool = False

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def sigma_max(self) -> float:
        # The first entry below 1, for the flow kernel's sigma = 1 step.
        return float(self.sigmas[1]) if self.num_steps > 1 else 0.5

    def transition(self, k: int, velocity, x) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.transition(
            self.kernel,
            velocity,
            x,
            self.sigmas[k],
            self.sigmas[k + 1],
            self.eta,
            sigma_max=self.sigma_max,
        )

    def ode_step(
        self, a: int, b: int, velocity, x, history: solvers.History | None
    ) -> tuple[torch.Tensor, solvers.History | None]:
        """The deterministic step from level ``a`` of the schedule to level ``b``."""
        return solvers.ode_step(self.solver, velocity, x, self.sigmas[a], self.sigmas[b], history)

    def plan(self, sde_steps: list[int]) -> list[tuple[int, int]]:
        return schedule.step_plan(self.num_steps, sde_steps, self.ode_stride)

    def step(self, k: int, kind: str, velocity, x, **kw) -> kernels.StepOutput:
        return kernels.step(
            kind,
            velocity,
            x,
            self.sigmas[k],
            self.sigmas[k + 1],
            self.eta,
            sigma_max=self.sigma_max,
            reduce=self.reduce,
            score=self.score,
            **kw,
        )


@dataclass
class Rollout:
    """A batch of trajectories; SDE-step tensors are stacked as [K, B, ...]."""

    prompts: list[str]
    group: torch.Tensor  # [B] group id (one per prompt draw)
    cond: Cond
    final: torch.Tensor  # [B, ...] final latents
    sde_steps: list[int]
    states: torch.Tensor
    next_states: torch.Tensor
    means: torch.Tensor
    log_probs: torch.Tensor  # [K, B]
    stds: torch.Tensor  # [K]
    # With a shared prefix: [B], the sample whose state and condition the group's first
    # recorded step was computed from (the sampler's ``members`` rows). Every sample of a
    # group has that step's state, condition and mean, so a replay of the step needs one
    # forward per group (``branch_rows``). None: every sample is its own.
    branch_source: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.final.shape[0]

    def branch_rows(self, i: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For recorded step ``i`` of the samples ``idx``: ``(rows, inverse)`` when the step
        is a shared prefix's branch step, so that a forward on ``rows`` (one sample per group
        present), indexed by ``inverse``, is the forward on ``idx``; None otherwise."""
        if self.branch_source is None or i != 0:
            return None
        rows, inverse = torch.unique(self.branch_source[idx], return_inverse=True)
        return rows, inverse


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, start + size)`` of a global batch of ``global_size`` samples.

    Used by multi-process training: each process draws the noise of the whole global batch
    from the shared generator and keeps its own rows, so sample ``j`` gets the same noise
    whatever the number of processes, and every process's generator stays in step.
    """

    start: int
    size: int
    global_size: int

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.start : self.start + self.size]


def _sharded_step(
    spec: SamplerSpec, k: int, v, x, generator: torch.Generator, shard: Shard
) -> kernels.StepOutput:
    # Draw exactly what a one-process sampler would draw for the global batch, keep our
    # rows, then score them through the replay path (the same transition and log-prob).
    mean, std = spec.transition(k, v, x)
    if not bool((std > 0).all()):  # a deterministic step draws nothing, as in kernels.step
        return spec.step(k, spec.kernel, v, x, generator=generator)
    noise = torch.randn(
        (shard.global_size, *mean.shape[1:]),
        generator=generator,
        device=generator.device,
        dtype=torch.float32,
    )
    prev = mean + std * shard.rows(noise).to(mean.device)
    return spec.step(k, spec.kernel, v, x, prev_sample=prev)


class ForwardCounter:
    """Counts model forward calls and the samples they process, per phase."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.samples: dict[str, int] = {}
        self.backward = 0

    def velocity(self, model: FlowModel, phase: str, x, sigma, cond, guidance_scale):
        self.calls[phase] = self.calls.get(phase, 0) + 1
        self.samples[phase] = self.samples.get(phase, 0) + x.shape[0]
        mark(phase)
        fault_point(phase)
        if torch.is_grad_enabled():
            # A split under gradient keeps every chunk's graph until the backward and saves
            # nothing: the update splits its minibatch with train.micro_batch instead.
            return model.velocity(x, sigma, cond, guidance_scale)
        return model.batched_velocity(x, sigma, cond, guidance_scale)

    def as_dict(self) -> dict[str, int]:
        out = {f"forward_calls/{k}": v for k, v in self.calls.items()}
        out.update({f"forward_samples/{k}": v for k, v in self.samples.items()})
        out["backward_calls"] = self.backward
        return out


@torch.no_grad()
def sample(
    model: FlowModel,
    cond: Cond,
    noise: torch.Tensor,
    spec: SamplerSpec,
    sde_steps: list[int],
    generator: torch.Generator,
    counter: ForwardCounter,
    phase: str = "rollout",
    shard: Shard | None = None,
    members: torch.Tensor | None = None,
    until_last_sde: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the sampler; return final latents and the recorded SDE steps.

    ``until_last_sde``: stop after the last SDE step and return the state reached there
    instead of the final latents, for a caller that needs only the recorded steps (the
    deterministic steps after it draw no noise, so the recorded steps are the same).

    With ``shard``, ``noise`` holds this process's rows of a global batch: every SDE step
    draws the whole global batch's noise from ``generator`` and keeps these rows (see
    :class:`Shard`). With ``members`` ([B]: the row of ``noise`` each sample starts from),
    the samples that share a row share everything up to the first SDE step: it is computed
    once per row of ``noise`` (with the condition of the row's first sample) and the
    samples branch at that step's noise.
    """
    x = noise.float()
    record: dict[str, list] = {"states": [], "next_states": [], "means": [], "log_probs": []}
    stds = []
    sde = set(sde_steps)
    branch, step_cond = None, cond
    if members is not None:
        if not sde:
            raise ValueError("a shared prefix needs an SDE step to branch at; got none")
        branch = min(sde)
        first = [int((members == i).nonzero()[0]) for i in range(x.shape[0])]
        step_cond = index_cond(cond, torch.tensor(first))
    history = None  # the ODE solver's last step; a stochastic step restarts it
    plan = spec.plan(sde_steps)
    if until_last_sde and sde:
        plan = plan[: plan.index((max(sde), max(sde) + 1)) + 1]
    with lora_folded(model.module) if spec.merge_lora else nullcontext():
        for a, b in plan:
            sigma = spec.sigmas[a].expand(x.shape[0])
            v = counter.velocity(model, phase, x, sigma, step_cond, spec.guidance_scale)
            if a == branch:  # the shared prefix ends: every sample goes on with its own row
                x, v, step_cond = x[members], v[members], cond
            if a not in sde:
                x, history = spec.ode_step(a, b, v, x, history)
                continue
            if shard is not None:
                out = _sharded_step(spec, a, v, x, generator, shard)
            else:
                out = spec.step(a, spec.kernel, v, x, generator=generator)
            record["states"].append(x)
            record["next_states"].append(out.prev_sample)
            record["means"].append(out.mean)
            record["log_probs"].append(out.log_prob)
            stds.append(out.std.reshape(()))
            x, history = out.prev_sample, None
    if not stds:  # an all-ODE pass records nothing
        return x, {}
    stacked = {k: torch.stack(v) for k, v in record.items()}
    stacked["stds"] = torch.stack(stds)
    if members is not None:
        stacked["branch_source"] = torch.tensor(first)[members]
    return x, stacked


def rollout(
    model: FlowModel,
    prompts: list[str],
    group: torch.Tensor,
    spec: SamplerSpec,
    sde_steps: list[int],
    generator: torch.Generator,
    counter: ForwardCounter,
    cond: Cond | None = None,
    phase: str = "rollout",
    shard: Shard | None = None,
    share_prefix: int = 1,
    until_last_sde: bool = False,
) -> Rollout:
    """Sample ``prompts`` (this process's rows of the global batch with ``shard``).

    ``until_last_sde``: only the recorded steps are wanted (an evaluation's KL); sampling
    stops after the last SDE step and ``final`` holds the state reached there.

    ``share_prefix = G > 1``: every run of ``G`` consecutive rows of the global batch (a
    group of the trainer's batch, one prompt) starts from one noise draw and shares its
    deterministic prefix up to the first SDE step, computed once per group (``sample``'s
    ``members``); the groups branch at that step. ``1``: every sample is independent.
    """
    cond = model.encode(prompts) if cond is None else cond
    rows = shard or Shard(0, len(prompts), len(prompts))
    members = None
    if share_prefix == 1:
        noise = rows.rows(model.initial_noise(rows.global_size, generator))
    else:
        if share_prefix < 1 or rows.global_size % share_prefix:
            raise ValueError(
                f"share_prefix must divide the global batch of {rows.global_size} samples "
                f"into groups, got {share_prefix}"
            )
        # The global group of each of our rows; the noise of the groups we touch.
        groups = torch.arange(rows.start, rows.start + rows.size) // share_prefix
        first, last = int(groups[0]), int(groups[-1])
        noise = model.initial_noise(rows.global_size // share_prefix, generator)
        noise, members = noise[first : last + 1], groups - first
    final, rec = sample(
        model,
        cond,
        noise,
        spec,
        sde_steps,
        generator,
        counter,
        phase,
        shard,
        members,
        until_last_sde,
    )
    if not rec:  # a deterministic rollout (DiffusionNFT's default) records no transition
        empty = final.new_empty((0, *final.shape))
        rec = {"states": empty, "next_states": empty, "means": empty}
        rec.update(log_probs=final.new_empty((0, final.shape[0])), stds=final.new_empty((0,)))
    return Rollout(prompts, group, cond, final, list(sde_steps), **rec)


@torch.no_grad()
def reference_kl(
    model: FlowModel,
    ro: Rollout,
    spec: SamplerSpec,
    counter: ForwardCounter,
    rows: torch.Tensor | None = None,
    phase: str = "ref_kl",
) -> torch.Tensor:
    """Exact per-step KL between the policy that sampled ``ro`` and the reference model,
    at every recorded SDE step of the rollout's own trajectories: [K, B], or [K, len(rows)]
    for the samples ``rows`` only. The forwards are counted under ``phase``."""
    rows = torch.arange(ro.batch_size) if rows is None else rows
    out = []
    with model.reference():
        for i, k in enumerate(ro.sde_steps):
            (v_ref,) = replay_velocities(model, ro, [i], rows, spec, counter, phase)
            mean_ref, std = spec.transition(k, v_ref, ro.states[i, rows])
            out.append(kernels.gaussian_kl(ro.means[i, rows], mean_ref, std, spec.reduce))
    return torch.stack(out)


def replay_velocities(
    model: FlowModel,
    ro: Rollout,
    steps: list[int],
    idx: torch.Tensor,
    spec: SamplerSpec,
    counter: ForwardCounter,
    phase: str,
) -> list[torch.Tensor]:
    """The model's velocity at each recorded step in ``steps`` of the samples ``idx``, from
    one forward over all of their rows (each row at its step's noise level), counted under
    ``phase``. A shared prefix's branch step runs once per group present in ``idx``
    (:meth:`Rollout.branch_rows`): its members have one state and one condition there, so
    the rows are the same numbers, and under gradient the index sums the members'
    gradients into that one row's."""
    rows, inverses = [], []
    for i in steps:
        shared = ro.branch_rows(i, idx)
        rows.append(idx if shared is None else shared[0])
        inverses.append(None if shared is None else shared[1])
    levels = [spec.sigmas[ro.sde_steps[i]].expand(len(r)) for i, r in zip(steps, rows)]
    if len(steps) == 1:
        x, sigma, cond = ro.states[steps[0], rows[0]], levels[0], index_cond(ro.cond, rows[0])
    else:
        x = torch.cat([ro.states[i, r] for i, r in zip(steps, rows)])
        sigma = torch.cat(levels)
        cond = cat_cond([index_cond(ro.cond, r) for r in rows])
    v = counter.velocity(model, phase, x, sigma, cond, spec.guidance_scale)
    chunks = v.split([len(r) for r in rows])
    return [c if inv is None else c[inv] for c, inv in zip(chunks, inverses, strict=True)]


def reference_kl_rows(group: torch.Tensor, per_group: int, seed: int) -> torch.Tensor:
    """``per_group`` samples of every group, drawn uniformly without replacement (sorted).

    Every group has the same size, so each sample is drawn with the same probability and
    the mean KL over the drawn samples is an unbiased estimate of the batch's mean KL
    (stratified by group: its variance is at most that of as many samples drawn from the
    whole batch). The draw has its own generator, seeded per iteration: the training
    stream is the same with any setting, and a resumed run draws the same rows.
    """
    keys = torch.rand(len(group), generator=torch.Generator().manual_seed(seed))
    picked = []
    for g in torch.unique(group):
        members = (group == g).nonzero().flatten()
        picked.append(members[keys[members].argsort()[:per_group]])
    return torch.cat(picked).sort().values
