"""The options that wire each baseline as its released trainer runs it, checked by the
trainer's own counters in metrics.jsonl (docs/method.md, "Recipes")."""

from __future__ import annotations

import pytest
import torch

from flowdppo.advantages import group_advantages
from flowdppo.config import ConfigError, load_config
from flowdppo.rewards import register_reward
from flowdppo.trainer.loop import Trainer, metrics_of


def _flat_dark(images, prompts):
    # Brightness for "bright"; a constant for "dark", so a "dark" group's advantages are 0.
    bright = images.mean(dim=(1, 2, 3))
    return torch.where(torch.tensor([p == "dark" for p in prompts]), 0.5, bright)


register_reward("toy_flat_dark")(lambda: _flat_dark)


def _run(tmp_path, overrides, name="run", iterations=2):
    cfg = load_config(None, [*overrides, f"train.iterations={iterations}", "log.eval_every=0"])
    trainer = Trainer(cfg, tmp_path / name)
    trainer.train()
    return trainer, metrics_of(tmp_path / name)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("overrides", "key", "algorithm"),
    [
        (["algorithm=grpo", "nft.rollout_model=old"], "nft.rollout_model", "grpo"),
        (["algorithm=nft", "train.trained_steps=[0,9]"], "train.trained_steps", "nft"),
    ],
)
def test_an_option_the_algorithm_cannot_use_is_one_line_naming_both(overrides, key, algorithm):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert key in text and repr(algorithm) in text and text.count("\n") <= 1


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.trained_steps=[0,11]"], "past the sampler.num_steps"),
        (["train.trained_steps=[3,2]"], "first < stop"),
        # 3 SDE steps drawn from steps 0-4; [4, 10) leaves 4 of them outside.
        (["train.trained_steps=[4,10]"], "can miss every SDE step"),
        (["reward.adv_eps=0"], "reward.adv_eps"),
        (["nft.rollout_model=new", "algorithm=nft"], "nft.rollout_model"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_adv_eps_is_the_constant_added_to_the_std():
    r = torch.tensor([0.0, 1.0, 2.0, 2.0])
    g = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(r, g, std="group", eps=1e-4)
    assert torch.allclose(adv, torch.tensor([-0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4), 0, 0]))
    assert load_config(None, []).reward.adv_eps == 1e-8  # the default numbers do not move


# ------------------------------------------------------------------ the counters


def test_nft_samples_with_the_old_model_when_asked(tmp_path, toy_overrides):
    base = [*toy_overrides, "algorithm=nft", "nft.decay_rate=0.5", "nft.decay_max=0.5"]
    for model in ("old", "current"):
        cfg = load_config(None, [*base, f"nft.rollout_model={model}", "train.iterations=2"])
        trainer = Trainer(cfg, tmp_path / model)
        seen = []
        real = trainer._rollout

        def spy(*args, real=real, trainer=trainer, seen=seen):
            # The trainable tensors in the network while the rollout samples.
            seen.append(
                {
                    n: p.detach().clone()
                    for n, p in trainer.model.module.named_parameters()
                    if n in trainer.old_model.tensors
                }
            )
            return real(*args)

        trainer._rollout = spy
        old_before = []
        iterate = trainer.run_iteration

        def run_iteration(iterate=iterate, trainer=trainer, old_before=old_before):
            old_before.append({n: t.clone() for n, t in trainer.old_model.tensors.items()})
            return iterate()

        trainer.run_iteration = run_iteration
        trainer.train()
        rows = metrics_of(tmp_path / model)
        assert [r["rollout/old_model"] for r in rows] == [int(model == "old")] * 2
        # The second iteration's old model lags the policy (decay 0.5 after one step).
        sampled, old = seen[1], old_before[1]
        same_as_old = all(torch.equal(sampled[n], old[n]) for n in old)
        assert same_as_old == (model == "old")
        # The policy is back in place after the rollout.
        assert not any(
            torch.equal(p, old[n]) for n, p in trainer.model.module.named_parameters() if n in old
        )


def test_every_step_stochastic_and_a_range_trained(tmp_path, toy_overrides):
    # GRPO-Guard's released trainer: every sampler step stochastic, steps 0 to N-2 trained.
    over = [
        *toy_overrides,
        "algorithm=guard",
        "sampler.num_sde_steps=6",
        "sampler.sde_window=[0,1]",
        "train.trained_steps=[0,5]",
    ]
    trainer, rows = _run(tmp_path, over)
    b = 2 * 4
    for r in rows:
        assert r["rollout/sde_steps"] == 6 and r["rollout/sde_step_mask"] == 0b111111
        assert r["update/trained_steps"] == 5 and r["update/trained_step_mask"] == 0b11111
        assert r["first_update_ratio_dev"] < 1e-5
    # 5 replayed steps of every sample per iteration, counted by the forward counter.
    assert rows[-1]["forward_samples/update"] == 2 * b * 5
    assert rows[-1]["forward_samples/rollout"] == 2 * b * 6


def test_dropped_samples_are_not_trained_and_the_step_count_holds(tmp_path, toy_overrides):
    over = [
        *toy_overrides,
        "algorithm=grpo",
        "reward.names=[toy_flat_dark]",
        "train.prompts_per_iteration=4",
        "train.minibatch_size=4",
        "train.grad_accum=2",
    ]
    runs = {}
    for drop in (False, True):
        runs[drop] = _run(tmp_path, [*over, f"train.drop_zero_advantage={drop}"], f"d{drop}", 3)[1]
    dropped = [r["update/dropped_samples"] for r in runs[True]]
    assert [r["update/dropped_samples"] for r in runs[False]] == [0] * 3
    assert any(d > 0 for d in dropped) and all(d % 4 == 0 for d in dropped)  # whole groups
    zero = [round(r["advantage/zero_fraction"] * 16) for r in runs[True]]
    assert dropped == zero
    update = [r["forward_samples/update"] for r in runs[True]]
    per_iteration = [b - a for a, b in zip([0, *update], update)]
    assert per_iteration == [(16 - d) * 2 for d in dropped]  # 2 SDE steps per kept sample
    # The kept samples fill the same 4 minibatches: 2 optimizer steps either way.
    for drop in (False, True):
        assert [r["update/optimizer_steps"] for r in runs[drop]] == [2] * 3


def test_one_optimizer_step_per_epoch_over_the_whole_batch(tmp_path, toy_overrides):
    # DiffusionNFT's GenEval and PickScore recipes: one gradient step per epoch; the old
    # model's decay counts optimizer steps, as return_decay(global_step) does.
    over = [
        *toy_overrides,
        "algorithm=nft",
        "train.minibatch_size=4",
        "train.grad_accum=2",
        "nft.decay_rate=0.1",
    ]
    _, rows = _run(tmp_path, over, iterations=3)
    assert [r["update/optimizer_steps"] for r in rows] == [1, 1, 1]
    assert [r["nft/old_decay"] for r in rows] == pytest.approx([0.1, 0.2, 0.3])
