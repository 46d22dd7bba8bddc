"""Fewer rollout forwards: a coarse grid for the deterministic steps (``sampler.ode_stride``)
and groups that share their prefix up to the first SDE step (``sampler.shared_prefix``).

The SDE steps keep the training schedule's levels (their std, log-prob and replay are those
of the full grid), the counters count every forward the model makes, and both options off
leave the sampler as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import ToyModel

from flowdppo import schedule
from flowdppo.config import ConfigError, load_config
from flowdppo.models.finetune import apply_finetuning, lora_folded
from flowdppo.trainer.distributed import check_world_size
from flowdppo.trainer.guards import TrainingError
from flowdppo.trainer.loop import Trainer
from flowdppo.trainer.rollout import (
    ForwardCounter,
    SamplerSpec,
    Shard,
    reference_kl,
    rollout,
    sample,
)
from flowdppo.trainer.update import ObjectiveSpec, step_loss

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["bright"] * 3 + ["dark"] * 3
GROUP = torch.tensor([0, 0, 0, 1, 1, 1])


class CountingToy(ToyModel):
    """The toy model, counting the rows of every velocity it computes."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        self.rows += x.shape[0]
        return super().velocity(x, sigma, cond, guidance_scale)


def _rollout(model, spec, steps, share=1, counter=None):
    gen = torch.Generator().manual_seed(0)
    counter = counter or ForwardCounter()
    return rollout(model, PROMPTS, GROUP, spec, steps, gen, counter, share_prefix=share)


def _assert_first_replay_ratio_is_one(model, ro, spec) -> None:
    for i in range(len(ro.sde_steps)):
        objective = ObjectiveSpec("dppo", 1e-4, 1e-4)
        advantages = torch.linspace(-1, 1, 6)
        _, stats = step_loss(
            model, ro, torch.arange(6), i, advantages, spec, objective, ForwardCounter()
        )
        assert float(stats["ratio_max"]) == 1 and float(stats["ratio_min"]) == 1


def test_step_plan_keeps_every_sde_step_and_strides_the_deterministic_stretches():
    assert schedule.step_plan(6, [2]) == [(k, k + 1) for k in range(6)]
    assert schedule.step_plan(10, [0, 2, 4], 2) == [
        (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 7), (7, 9), (9, 10)
    ]  # fmt: skip
    assert schedule.step_plan(10, [], 4) == [(0, 4), (4, 8), (8, 10)]
    for n, steps, stride in [(10, [1, 3], 3), (7, [6], 2), (12, [0, 5, 6], 5), (5, [], 1)]:
        plan = schedule.step_plan(n, steps, stride)
        # A chain from level 0 to level n; SDE steps are the schedule's own transitions.
        assert [a for a, _ in plan] + [n] == [plan[0][0]] + [b for _, b in plan]
        assert plan[0][0] == 0 and all(b - a <= stride for a, b in plan)
        assert all((k, k + 1) in plan for k in steps)
        stretches = [len(list(g)) for g in _stretches(n, steps)]
        assert len(plan) == len(steps) + sum(math.ceil(m / stride) for m in stretches)
    with pytest.raises(ValueError, match="ode_stride must be >= 1"):
        schedule.step_plan(10, [1], 0)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.9"):
        schedule.step_plan(10, [10], 2)


def _stretches(n, steps):
    run: list[int] = []
    for k in range(n):
        if k in steps:
            if run:
                yield run
            run = []
        else:
            run.append(k)
    if run:
        yield run


def test_coarse_grid_is_the_solver_on_the_sub_schedule_and_sde_steps_keep_their_levels():
    model = ToyModel()
    sigmas = schedule.sigma_schedule(12, 3.0)
    cond = model.encode(PROMPTS)
    noise = model.initial_noise(6, torch.Generator().manual_seed(3))
    for solver in ("euler", "dpm2"):
        # With no SDE step, stride 3 on 12 levels is exactly the sampler on levels 0, 3, .., 12.
        coarse = SamplerSpec("flow", sigmas, 0.7, solver=solver, ode_stride=3)
        sub = SamplerSpec("flow", sigmas[::3], 0.7, solver=solver)
        ours, _ = sample(model, cond, noise, coarse, [], None, ForwardCounter())
        assert torch.equal(ours, sample(model, cond, noise, sub, [], None, ForwardCounter())[0])
    # With SDE steps: the stochastic transitions are the full schedule's (same std, level
    # for level), and the full grid's replay scores the recorded steps with ratio exactly 1.
    fine = SamplerSpec("flow", sigmas, 0.7, solver="dpm2")
    coarse = SamplerSpec("flow", sigmas, 0.7, solver="dpm2", ode_stride=3)
    ro_fine, ro = _rollout(model, fine, [1, 4]), _rollout(model, coarse, [1, 4])
    assert torch.equal(ro.stds, ro_fine.stds)
    assert torch.equal(ro.states[0], ro_fine.states[0])  # step 0 is in both plans
    assert not torch.equal(ro.states[1], ro_fine.states[1])  # steps 2-3 became one
    _assert_first_replay_ratio_is_one(model, ro, fine)


@pytest.mark.parametrize(("stride", "share"), [(1, 1), (3, 1), (1, 3), (2, 3)])
def test_counters_count_every_forward_the_rollout_makes(stride, share):
    model = CountingToy()
    counter = ForwardCounter()
    spec = SamplerSpec("flow", schedule.sigma_schedule(10), 0.7, ode_stride=stride)
    steps = [3, 4]
    _rollout(model, spec, steps, share, counter)
    plan = schedule.step_plan(10, steps, stride)
    prefix = sum(1 for a, _ in plan if a <= 3) if share > 1 else 0  # through the branch
    assert counter.calls == {"rollout": len(plan)}
    assert counter.samples == {"rollout": 2 * prefix + 6 * (len(plan) - prefix)}
    assert model.rows == counter.samples["rollout"]
    assert len(plan) == {1: 10, 2: 7, 3: 5}[stride]


def test_shared_prefix_members_are_one_sample_until_the_branch_and_differ_after():
    model = ToyModel()
    spec = SamplerSpec("flow", schedule.sigma_schedule(8), 0.7, solver="dpm2")
    ro = _rollout(model, spec, [2, 5], share=3)
    for members in ((0, 1, 2), (3, 4, 5)):
        first, *rest = members
        for m in rest:
            # The state at the first SDE step and its mean: one per group.
            assert torch.equal(ro.states[0, m], ro.states[0, first])
            assert torch.equal(ro.means[0, m], ro.means[0, first])
            # The branch's noise and everything after it: each member's own.
            assert not torch.allclose(ro.next_states[0, m], ro.next_states[0, first])
            assert not torch.allclose(ro.final[m], ro.final[first])
    # The groups' own noise draws: two groups, two prefixes.
    assert not torch.allclose(ro.states[0, 0], ro.states[0, 3])
    # The stored transitions replay with ratio exactly 1.
    _assert_first_replay_ratio_is_one(model, ro, spec)
    with pytest.raises(ValueError, match="needs an SDE step to branch at"):
        _rollout(model, spec, [], share=3)
    with pytest.raises(ValueError, match="share_prefix must divide the global batch of 6"):
        _rollout(model, spec, [2], share=4)


def test_a_shared_prefix_branch_step_replays_once_per_group_with_the_same_loss_and_gradient():
    # The members of a group have one state and condition at the branch step: the update,
    # its reference penalty and the reference KL run it once per group present, and the
    # index sums the members' gradients. The same numbers as one forward per sample.
    spec = SamplerSpec("flow", schedule.sigma_schedule(8), 0.7)
    model = CountingToy()
    model.frozen_reference = copy.deepcopy(model.module)
    with torch.no_grad():  # a policy away from the reference: a nonzero KL and penalty
        for p in model.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ro = _rollout(model, spec, [2, 5], share=3)
    assert ro.branch_source.tolist() == [0, 0, 0, 3, 3, 3]
    independent = dataclasses.replace(ro, branch_source=None)
    idx = torch.tensor([5, 0, 2, 3, 1])  # both groups, out of order
    advantages = torch.linspace(-1, 1, 6)
    objective = ObjectiveSpec("dppo", 1e-4, 1e-4, beta=0.1)
    seen = {}
    for name, r in (("shared", ro), ("independent", independent)):
        for i in range(2):
            model.module.zero_grad()
            counter = ForwardCounter()
            loss, stats = step_loss(model, r, idx, i, advantages, spec, objective, counter)
            loss.sum().backward()
            grads = [p.grad.clone() for p in model.module.parameters()]
            seen[name, i] = (loss.detach(), stats["ref_penalty"], grads, counter.samples)
        counter = ForwardCounter()
        seen[name, "kl"] = (reference_kl(model, r, spec, counter), counter.samples["ref_kl"])
    for i in range(2):
        (loss, penalty, grads, counts), (loss_i, penalty_i, grads_i, counts_i) = (
            seen["shared", i],
            seen["independent", i],
        )
        torch.testing.assert_close(loss, loss_i, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(penalty, penalty_i, rtol=1e-6, atol=1e-9)
        assert float(penalty) > 0
        for g, g_i in zip(grads, grads_i, strict=True):
            torch.testing.assert_close(g, g_i, rtol=1e-5, atol=1e-7)
        # Two groups in the minibatch: two rows at the branch step, five after it.
        rows = 2 if i == 0 else 5
        assert counts == {"update": rows, "update_ref": rows}
        assert counts_i == {"update": 5, "update_ref": 5}
    (kl, kl_rows), (kl_i, kl_rows_i) = seen["shared", "kl"], seen["independent", "kl"]
    torch.testing.assert_close(kl, kl_i, rtol=1e-6, atol=1e-12)
    assert float(kl.min()) > 0
    assert (kl_rows, kl_rows_i) == (2 + 6, 6 + 6)
    _assert_first_replay_ratio_is_one(model, ro, spec)


def _lora_toy() -> ToyModel:
    model = ToyModel()
    apply_finetuning(model, "lora", rank=4, alpha=8.0, targets=["inp", "out"])
    with torch.no_grad():  # trained adapters: B away from its zero start
        for name, p in model.module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return model


def test_merge_lora_samples_the_same_function_and_puts_the_weights_back_exactly():
    model = _lora_toy()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    spec = SamplerSpec("flow", schedule.sigma_schedule(8), 0.7, solver="dpm2")
    folded_spec = dataclasses.replace(spec, merge_lora=True)
    plain, counter = _rollout(model, spec, [2, 5]), ForwardCounter()
    folded = _rollout(model, folded_spec, [2, 5], counter=counter)
    # The same samples up to float rounding, from the same number of forwards.
    for name in ("states", "next_states", "means", "final"):
        torch.testing.assert_close(
            getattr(folded, name), getattr(plain, name), rtol=1e-5, atol=1e-6
        )
    assert counter.samples["rollout"] == 6 * 8
    # Every tensor exactly as before, the adapters live again.
    after = model.module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x, sigma, cond = plain.states[0], torch.full((6,), 0.5), model.encode(PROMPTS)
    unfolded = model.velocity(x, sigma, cond)
    with lora_folded(model.module):
        v = model.velocity(x, sigma, cond)
        assert not torch.equal(v, unfolded)  # the fold rounds differently ...
        torch.testing.assert_close(v, unfolded, rtol=1e-5, atol=1e-6)  # ... to the same values
    # An error inside the block restores the weights too.
    with pytest.raises(RuntimeError, match="inside"):
        with lora_folded(model.module):
            raise RuntimeError("inside")
    assert all(torch.equal(before[k], model.module.state_dict()[k]) for k in before)
    # The reference (adapters disabled) is left alone: it stays the base network.
    with model.reference():
        reference = model.velocity(x, sigma, cond)
        with lora_folded(model.module):
            assert torch.equal(model.velocity(x, sigma, cond), reference)
    # The stored transitions replay through the adapters with a ratio of 1 to rounding.
    for i in range(2):
        _, stats = step_loss(
            model,
            folded,
            torch.arange(6),
            i,
            torch.linspace(-1, 1, 6),
            spec,
            ObjectiveSpec("dppo", 1e-4, 1e-4),
            ForwardCounter(),
        )
        assert abs(float(stats["ratio_max"]) - 1) < 1e-5
        assert abs(float(stats["ratio_min"]) - 1) < 1e-5


def test_merge_lora_leaves_what_it_cannot_fold_alone():
    # The text and shapes tasks recommend it: full fine-tuning (no adapter) and FSDP
    # (sharded weights) still run, unfolded.
    from flowdppo.trainer.loop import make_sampler_spec

    cfg = load_config(None, ["sampler.merge_lora=true", "model.finetune=full"])
    assert make_sampler_spec(cfg, 1.0, None).merge_lora
    fsdp = load_config(None, ["sampler.merge_lora=true", "train.distributed=fsdp"])
    assert not make_sampler_spec(fsdp, 1.0, None).merge_lora
    assert not load_config(None, []).sampler.merge_lora
    model = ToyModel()  # no LoRA layer: the fold is the identity
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    x, sigma, cond = torch.randn(6, 2, 2, 2), torch.full((6,), 0.5), model.encode(PROMPTS)
    v = model.velocity(x, sigma, cond)
    with lora_folded(model.module):
        assert torch.equal(model.velocity(x, sigma, cond), v)
    assert all(torch.equal(before[k], model.module.state_dict()[k]) for k in before)


def test_shared_prefix_rows_of_a_shard_are_those_rows_of_the_whole_rollout():
    model = ToyModel()
    spec = SamplerSpec("flow", schedule.sigma_schedule(6), 0.7, ode_stride=2)
    whole_gen = torch.Generator().manual_seed(5)
    whole = rollout(
        model, PROMPTS, GROUP, spec, [1, 2], whole_gen, ForwardCounter(), share_prefix=3
    )
    # Whole groups per process (what torchrun allows), and a group split over two.
    for start, size in [(0, 3), (3, 3), (2, 2)]:
        gen = torch.Generator().manual_seed(5)
        rows = slice(start, start + size)
        part = rollout(
            model,
            PROMPTS[rows],
            GROUP[rows],
            spec,
            [1, 2],
            gen,
            ForwardCounter(),
            shard=Shard(start, size, 6),
            share_prefix=3,
        )
        torch.testing.assert_close(part.states, whole.states[:, rows], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(part.final, whole.final[rows], rtol=1e-6, atol=1e-6)
        # The generator advanced exactly as in the whole rollout: processes stay in step.
        assert torch.equal(gen.get_state(), whole_gen.get_state()), (start, size)


def test_options_are_off_by_default_validated_and_refused_where_they_cannot_work():
    cfg = load_config(None, ["task=toy"])
    assert (cfg.sampler.ode_stride, cfg.sampler.shared_prefix) == (1, False)
    with pytest.raises(ConfigError, match=r"sampler.ode_stride \(11\) is more than"):
        load_config(None, ["sampler.ode_stride=11"])
    with pytest.raises(ConfigError, match="sampler.ode_stride"):
        load_config(None, ["sampler.ode_stride=0"])
    with pytest.raises(ConfigError, match="samples with no SDE step"):
        load_config(None, ["algorithm=nft", "sampler.shared_prefix=true"])
    load_config(None, ["algorithm=nft+flow", "sampler.shared_prefix=true"])
    # torchrun: every process must hold whole groups.
    shared = load_config(
        None, ["train.prompts_per_iteration=3", "train.group_size=2", "sampler.shared_prefix=true"]
    )
    with pytest.raises(TrainingError, match="make train.prompts_per_iteration \\(3\\) a multiple"):
        check_world_size(shared, 2)  # 3 samples per process: a group is split
    check_world_size(shared, 3)
    check_world_size(load_config(None, ["train.prompts_per_iteration=3", "train.group_size=2"]), 2)


def test_a_training_iteration_with_both_options_logs_its_forwards(tmp_path, toy_overrides):
    over = [
        *toy_overrides,
        "sampler.solver=dpm2",
        "sampler.ode_stride=2",
        "sampler.shared_prefix=true",
        f"log.run_dir={tmp_path / 'run'}",
    ]
    trainer = Trainer(load_config(None, over), tmp_path / "run")
    # Evaluations keep every level of the schedule; only the rollouts take the stride.
    assert (trainer.rollout_spec.ode_stride, trainer.evaluator.spec.ode_stride) == (2, 1)
    row = trainer.run_iteration()
    trainer._release_run_dir()
    steps = [k for k in range(6) if int(row["rollout/sde_step_mask"]) >> k & 1]
    plan = schedule.step_plan(6, steps, 2)
    prefix = sum(1 for a, _ in plan if a <= steps[0])
    # 2 prompts x 4 members: the prefix runs once per group.
    assert row["forward_samples/rollout"] == 2 * prefix + 8 * (len(plan) - prefix)
    assert row["rollout/forwards_per_sample"] == row["forward_samples/rollout"] / 8
    assert row["first_update_ratio_dev"] < 1e-5 and row["grad_norm"] > 0


def test_an_evaluation_kl_rollout_stops_after_its_last_sde_step():
    # The KL needs the states at the SDE steps only: stopping after the last one records
    # the same tensors, draws the same noise and spends fewer forwards.
    spec = SamplerSpec("flow", schedule.sigma_schedule(10), 0.7)
    full_model, short_model = CountingToy(), CountingToy()
    full = _rollout(full_model, spec, [1, 4])
    gen = torch.Generator().manual_seed(0)
    short = rollout(
        short_model, PROMPTS, GROUP, spec, [1, 4], gen, ForwardCounter(), until_last_sde=True
    )
    for name in ("states", "next_states", "means", "log_probs", "stds"):
        assert torch.equal(getattr(short, name), getattr(full, name)), name
    assert torch.equal(short.final, full.next_states[-1])  # the state after step 4
    assert (full_model.rows, short_model.rows) == (6 * 10, 6 * 5)
    # No SDE step: nothing to stop after, the whole sampler runs.
    gen = torch.Generator().manual_seed(0)
    ode = rollout(ToyModel(), PROMPTS, GROUP, spec, [], gen, ForwardCounter(), until_last_sde=True)
    assert torch.equal(ode.final, _rollout(ToyModel(), spec, []).final)
