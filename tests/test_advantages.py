import pytest
import torch

from flowdppo.advantages import combine_rewards, group_advantages


def test_equal_rewards_in_a_group_give_zero_not_nan():
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.5])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    for std in ("group", "global"):
        adv = group_advantages(rewards, group, std=std)
        assert torch.isfinite(adv).all()
        assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.equal(
        group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long)), torch.zeros(4)
    )


def test_group_vs_global_std():
    rewards = torch.tensor([0.0, 2.0, 10.0, 30.0])
    group = torch.tensor([0, 0, 1, 1])
    per_group = group_advantages(rewards, group, std="group")
    assert torch.allclose(per_group, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    centred = torch.tensor([-1.0, 1.0, -10.0, 10.0])
    glob = group_advantages(rewards, group, std="global")
    assert torch.allclose(glob, centred / rewards.std(unbiased=False))


def test_groups_need_not_be_contiguous_and_clip_bounds():
    rewards = torch.tensor([1.0, 5.0, 3.0, 7.0])
    group = torch.tensor([3, 9, 3, 9])
    adv = group_advantages(rewards, group, std="group")
    assert torch.allclose(adv, torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.zeros(4), clip=1.0)
    assert clipped.max() == 1.0 and clipped.min() >= -1.0


def test_weighted_combination_sums_raw_rewards_first():
    group = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([1.0, 0.0, 1.0, 0.0])
    b = torch.tensor([0.0, 100.0, 0.0, 100.0])
    adv = combine_rewards({"a": a, "b": b}, group, weights={"a": 1.0, "b": 0.5}, std="group")
    assert torch.allclose(adv, group_advantages(a + 0.5 * b, group, std="group"))
    # The large-scale reward dominates the raw sum.
    assert adv[1] > 0 and adv[0] < 0


def test_gdpo_normalises_each_reward_before_summing():
    group = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([1.0, 0.0, 1.0, 0.0])
    b = torch.tensor([0.0, 100.0, 0.0, 100.0])
    adv = combine_rewards({"a": a, "b": b}, group, method="gdpo")
    # Each reward contributes +-1 per group and they cancel: no reward drowns the other.
    assert torch.allclose(adv, torch.zeros(4), atol=1e-6)
    adv = combine_rewards({"a": a, "b": b}, group, method="gdpo", weights={"a": 2.0})
    assert adv[0] > 0 and adv[1] < 0
    assert adv.mean().abs() < 1e-6 and adv.std(unbiased=False).item() == pytest.approx(1, rel=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_advantages(torch.zeros(3), torch.zeros(2)), "equal length"),
        (lambda: group_advantages(torch.zeros(2), torch.zeros(2), std="batch"), "std must be"),
        (lambda: group_advantages(torch.zeros(2), torch.zeros(2), clip=0.0), "clip"),
        (
            lambda: combine_rewards({"a": torch.zeros(2)}, torch.zeros(2), method="sum"),
            "combination",
        ),
        (
            lambda: combine_rewards({"a": torch.zeros(2)}, torch.zeros(2), weights={"b": 1}),
            "unknown",
        ),
    ],
)
def test_advantage_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
