import itertools
import math

import pytest
import torch

from flowdppo.objectives import dppo_loss, dppo_mask, grpo_clip_loss, reference_kl_penalty

DELTA = 1e-3
STD = 0.5


def _case(adv_sign, ratio_up, kl_big):
    """One element with the given advantage sign, ratio side and KL side."""
    log_ratio = 0.01 if ratio_up else -0.01
    # gaussian_kl (mean over 4 elements) = d^2 / (2 std^2); pick d to land either side of DELTA.
    d = math.sqrt(2 * STD**2 * (10 * DELTA if kl_big else 0.1 * DELTA))
    mean_old = torch.zeros(1, 4)
    mean_new = mean_old + d
    logp_old = torch.tensor([-1.0])
    logp_new = (logp_old + log_ratio).requires_grad_(True)
    adv = torch.tensor([float(adv_sign)])
    return logp_new, logp_old, mean_new, mean_old, adv


@pytest.mark.parametrize(
    "adv_sign,ratio_up,kl_big", list(itertools.product([1, -1], [True, False], [True, False]))
)
def test_dppo_mask_every_combination(adv_sign, ratio_up, kl_big):
    logp_new, logp_old, mean_new, mean_old, adv = _case(adv_sign, ratio_up, kl_big)
    loss, stats = dppo_loss(logp_new, logp_old, mean_new, mean_old, STD, adv, DELTA)
    pushes_further = (adv_sign > 0) == ratio_up
    blocked = kl_big and pushes_further
    loss.sum().backward()
    ratio = math.exp(logp_new.item() - logp_old.item())
    assert stats["masked_fraction"].item() == float(blocked)
    assert stats["kl_mask_fraction"].item() == float(kl_big)
    if blocked:
        assert loss.item() == 0 and logp_new.grad.item() == 0
    else:
        # Gradient of -A r with respect to log pi_new is -A r.
        assert loss.item() == pytest.approx(-adv_sign * ratio)
        assert logp_new.grad.item() == pytest.approx(-adv_sign * ratio)


def test_dppo_no_nan_when_the_log_ratio_overflows():
    logp_old = torch.zeros(4)
    logp_new = torch.tensor([1000.0, 1000.0, -1000.0, -1000.0], requires_grad=True)
    adv = torch.tensor([1.0, 0.5, -1.0, -2.0])  # every element pushes further
    mean_old = torch.zeros(4, 8)
    mean_new = torch.ones(4, 8)  # far outside any trusted zone
    loss, stats = dppo_loss(logp_new, logp_old, mean_new, mean_old, STD, adv, DELTA)
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros(4))
    assert torch.equal(logp_new.grad, torch.zeros(4))
    assert stats["masked_fraction"].item() == 1.0
    assert not any(torch.isnan(v).any() for v in stats.values())


def test_dppo_kl_only_and_first_order_masks():
    log_ratio = torch.tensor([0.1, -0.1, 0.1, 1e-4])
    kl = torch.tensor([1.0, 1.0, 0.0, 1.0])
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    # The ablation blocks everything outside the zone, corrective moves included.
    assert dppo_mask(log_ratio, kl, adv, 0.5, "kl").tolist() == [True, True, False, True]
    assert dppo_mask(log_ratio, kl, adv, 0.5, "asymmetric").tolist() == [False, True, False, True]
    # First order: log r - D; the last element's log r is below D, so it is predicted corrective.
    assert dppo_mask(log_ratio, kl, adv, 0.5, "first_order").tolist() == [True, True, False, False]


def test_dppo_ratio_is_one_and_loss_is_minus_advantage_at_the_anchor():
    logp = torch.randn(5)
    mean = torch.randn(5, 3)
    adv = torch.randn(5)
    loss, stats = dppo_loss(logp.clone().requires_grad_(), logp, mean, mean, STD, adv, DELTA)
    assert torch.allclose(loss, -adv)
    assert stats["ratio_mean"].item() == 1 and stats["kl_max"].item() == 0
    assert stats["masked_fraction"].item() == 0


def test_grpo_clip_behaviour():
    logp_old = torch.zeros(4)
    log_r = torch.tensor([0.5, -0.5, 0.5, -0.5])
    logp_new = log_r.clone().requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = grpo_clip_loss(logp_new, logp_old, adv, 0.2)
    loss.sum().backward()
    r = torch.exp(log_r)
    # A>0, r>1+eps: clipped (no gradient). A>0, r<1-eps: unclipped pessimistic term.
    # A<0, r>1+eps: unclipped. A<0, r<1-eps: clipped.
    expected = torch.tensor([-1.2, -r[1].item(), r[2].item(), 0.8])
    assert torch.allclose(loss.detach(), expected, atol=1e-6)
    assert torch.allclose(logp_new.grad, torch.tensor([0.0, -r[1].item(), r[2].item(), 0.0]))
    assert stats["clip_fraction"].item() == 1.0
    assert stats["ratio_max"].item() == pytest.approx(r.max().item())


def test_grpo_asymmetric_clip_range():
    logp_new = torch.tensor([0.25])
    loss, _ = grpo_clip_loss(logp_new, torch.zeros(1), torch.ones(1), 0.1, clip_range_high=0.3)
    assert loss.item() == pytest.approx(-math.exp(0.25))  # inside [0.9, 1.3]


def test_reference_penalty_is_beta_times_exact_kl_with_gradient():
    mean = torch.zeros(2, 4, requires_grad=True)
    ref = torch.ones(2, 4)
    pen = reference_kl_penalty(mean, ref, STD, beta=1e-3)
    assert torch.allclose(pen, torch.full((2,), 1e-3 * 1 / (2 * STD**2)))
    pen.sum().backward()
    assert mean.grad is not None and (mean.grad != 0).all()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: grpo_clip_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), 0.1), "one shape"),
        (lambda: grpo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0), "> 0"),
        (
            lambda: dppo_loss(
                torch.zeros(3),
                torch.zeros(3),
                torch.zeros(2, 4),
                torch.zeros(2, 4),
                STD,
                torch.zeros(3),
                DELTA,
            ),
            "one mean per log-prob",
        ),
        (
            lambda: dppo_loss(
                torch.zeros(2),
                torch.zeros(2),
                torch.zeros(2, 4),
                torch.zeros(2, 4),
                STD,
                torch.zeros(2),
                -1.0,
            ),
            "threshold",
        ),
        (lambda: dppo_mask(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1, "sym"), "mask"),
    ],
)
def test_objective_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _objective_cases():
    """Every objective on one batch of random terms: ratios on both sides of every window,
    KLs on both sides of the threshold, a few zero advantages and one underflowing ratio.
    Returns the objectives (functions of logp_new), the advantages and logp_new, logp_old."""
    g = torch.Generator().manual_seed(3)
    n = 4000
    log_ratio = torch.randn(n, generator=g) * 0.3
    log_ratio[0] = -200.0  # exp underflows to exactly 0
    adv = torch.randn(n, generator=g)
    adv[1:40] = 0.0
    mean_old = torch.randn(n, 8, generator=g)
    mean_new = mean_old + torch.randn(n, 8, generator=g) * 0.05 * torch.rand(n, 1, generator=g)
    logp_old = torch.randn(n, generator=g)
    cases = {
        "clip": lambda lp: grpo_clip_loss(lp, logp_old, adv, 0.2),
        "clip-asymmetric": lambda lp: grpo_clip_loss(lp, logp_old, adv, 0.1, 0.3),
    }
    for mask in ("asymmetric", "kl", "first_order"):
        cases[f"dppo-{mask}"] = lambda lp, m=mask: dppo_loss(
            lp, logp_old, mean_new, mean_old, STD, adv, DELTA, mask=m
        )
    return cases, adv, logp_old + log_ratio, logp_old


@pytest.mark.parametrize("name", list(_objective_cases()[0]))
def test_grad_blocked_fraction_counts_exactly_the_zero_gradients(name):
    cases, _, logp_new, _ = _objective_cases()
    logp_new = logp_new.clone().requires_grad_(True)
    loss, stats = cases[name](logp_new)
    loss.sum().backward()
    zero = (logp_new.grad == 0).float().mean().item()
    assert 0.05 < zero < 0.95  # both kinds of term are present
    assert stats["grad_blocked_fraction"].item() == pytest.approx(zero, abs=1e-7)


def test_clip_fraction_is_the_window_and_counts_terms_that_keep_their_gradient():
    cases, adv, logp_new, logp_old = _objective_cases()
    logp_new = logp_new.clone().requires_grad_(True)
    loss, stats = cases["clip"](logp_new)
    loss.sum().backward()
    ratio = torch.exp(logp_new.detach() - logp_old)
    outside = (ratio < 0.8) | (ratio > 1.2)
    assert stats["clip_fraction"].item() == pytest.approx(outside.float().mean().item())
    # Outside the window against the advantage's direction the unclipped branch wins the
    # max: those terms count in the window fraction and keep their gradient.
    kept = outside & (adv != 0) & (logp_new.grad != 0)
    assert kept.float().mean() > 0.1
