"""GRPO-Guard, DiffusionNFT and the official Flow-DPPO KL convention (docs/method.md)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import checkpoint_digests, crash_after_checkpoint

from flowdppo import kernels, schedule
from flowdppo.config import ConfigError, NftConfig, load_config
from flowdppo.objectives import (
    guard_log_ratio,
    guard_loss,
    nft_loss,
    nft_reward_weight,
)
from flowdppo.trainer.loop import Trainer, metrics_of
from flowdppo.trainer.rollout import SamplerSpec
from flowdppo.trainer.update import _step_kl

# ------------------------------------------------------------------ GRPO-Guard


def _old_policy_step(std: float, d: int, n: int, delta: torch.Tensor, seed: int):
    """Samples of one Gaussian step of the old policy, and both policies' log-probs."""
    g = torch.Generator().manual_seed(seed)
    mean_old = torch.randn(1, d, generator=g, dtype=torch.float64).expand(n, d)
    mean_new = mean_old + delta
    x = mean_old + std * torch.randn(n, d, generator=g, dtype=torch.float64)
    lp_old = kernels.gaussian_log_prob(x, mean_old, std)
    lp_new = kernels.gaussian_log_prob(x, mean_new, std)
    return lp_new, lp_old, mean_new, mean_old


def test_guard_log_ratio_is_centred_with_the_same_variance_at_every_noise_level():
    d, n = 64, 20000
    g = torch.Generator().manual_seed(5)
    delta = 0.01 * torch.randn(1, d, generator=g, dtype=torch.float64)
    theory = float((delta**2).mean()) / d  # Var[mean(xi * delta)]
    raw_vars = []
    for step, std in enumerate((0.05, 0.4)):
        lp_new, lp_old, mean_new, mean_old = _old_policy_step(std, d, n, delta, seed=step)
        z, kl = guard_log_ratio(lp_new, lp_old, mean_new, mean_old, std)
        z = z.double()
        # Mean 0 within 4 standard errors, and the theoretical variance: standardised by it,
        # the normalised log-ratio has unit variance at both steps.
        assert abs(float(z.mean())) < 4 * math.sqrt(theory / n)
        assert float(z.var() / theory) == pytest.approx(1.0, abs=0.05)
        raw = lp_new.double() - lp_old.double()
        # The raw log-ratio is shifted left by the KL (variance 2 D / d, Gaussian theory).
        se = math.sqrt(2 * float(kl[0]) / d / n)
        assert abs(float(raw.mean()) + float(kl[0])) < 4 * se
        raw_vars.append(float(raw.var()))
    # The raw log-ratio's variance scales with 1 / std^2: (0.4 / 0.05)^2 = 64 between them.
    assert raw_vars[0] / raw_vars[1] == pytest.approx(64, rel=0.05)


def _direct_guard(lp_new, lp_old, mu_new, mu_old, std, dt, adv, eps):
    # GRPO-Guard as its paper and public code write it, term by term.
    bias = ((mu_new - mu_old) ** 2).mean(dim=(1, 2)) / (2 * std**2)
    ratio = torch.exp((lp_new - lp_old + bias) * std)
    surrogate = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps))
    return surrogate / (-dt)


def test_guard_loss_equals_the_formula_and_blocks_clipped_terms_exactly():
    g = torch.Generator().manual_seed(0)
    b, std, dt, eps = 400, 0.3, -0.09, 2e-3
    mu_old = torch.randn(b, 4, 4, generator=g)
    lp_old = torch.randn(b, generator=g)
    adv = torch.randn(b, generator=g)
    adv[:10] = 0.0
    leaves = [
        (mu_old + 0.01 * torch.randn(b, 4, 4, generator=g)).requires_grad_(),
        (lp_old + 0.02 * torch.randn(b, generator=g)).requires_grad_(),
    ]
    loss, stats = guard_loss(leaves[1], lp_old, leaves[0], mu_old, std, dt, adv, eps)
    loss.sum().backward()
    grads = [t.grad.clone() for t in leaves]
    direct_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    direct = _direct_guard(direct_leaves[1], lp_old, direct_leaves[0], mu_old, std, dt, adv, eps)
    direct.sum().backward()
    torch.testing.assert_close(loss, direct)
    for got, want in zip(grads, (t.grad for t in direct_leaves), strict=True):
        torch.testing.assert_close(got, want)
    # Terms past the window in their advantage's direction, or with A = 0, get exactly zero
    # gradient, and grad_blocked_fraction counts exactly them.
    z, _ = guard_log_ratio(leaves[1].detach(), lp_old, leaves[0].detach(), mu_old, std)
    r = torch.exp(z)
    blocked = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps)) | (adv == 0)
    assert 0.1 < float(blocked.float().mean()) < 0.9
    zero = (grads[1] == 0) & (grads[0] == 0).flatten(1).all(1)
    assert torch.equal(zero, blocked)
    assert float(stats["grad_blocked_fraction"]) == pytest.approx(float(blocked.float().mean()))


# ------------------------------------------------------------------ DiffusionNFT


def _nft_inputs(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 4, 4, generator=g)
    noise = torch.randn(b, 3, 4, 4, generator=g)
    sigma = torch.rand(b, generator=g) * 0.8 + 0.1
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v_old = (noise - x0) + 0.3 * torch.randn(b, 3, 4, 4, generator=g)
    return x0, noise, sigma, x_t, v_old


def test_nft_weight_one_is_flow_matching_towards_the_positive_policy():
    x0, noise, sigma, x_t, v_old = _nft_inputs()
    beta = 0.4
    v = (v_old + 0.05 * torch.randn_like(v_old)).requires_grad_()
    loss, _ = nft_loss(v, v_old, x_t, x0, sigma, torch.ones(6), beta)
    (grad,) = torch.autograd.grad(loss.sum(), v)
    # Flow matching of the positive policy beta v + (1 - beta) v_old to the target
    # noise - x0, in x0 units (x0 - x0_hat = sigma (v - target)), with the recipe's
    # detached adaptive weight.
    v2 = v.detach().clone().requires_grad_()
    s = sigma.view(-1, 1, 1, 1)
    err = s * (beta * v2 + (1 - beta) * v_old - (noise - x0))
    w = err.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    fm = ((err**2) / w).mean(dim=(1, 2, 3)) / beta
    (want,) = torch.autograd.grad(fm.sum(), v2)
    torch.testing.assert_close(grad, want)


def test_nft_positive_and_negative_terms_cancel_at_the_old_policy():
    x0, _, sigma, x_t, v_old = _nft_inputs(seed=1)

    def grad_at_old(weight):
        v = v_old.clone().requires_grad_()
        loss, _ = nft_loss(v, v_old, x_t, x0, sigma, torch.full((6,), weight), 1.0)
        return torch.autograd.grad(loss.sum(), v)[0]

    # At v = v_old the implicit policies coincide: weights r and 1 - r push in exactly
    # opposite directions, so a sample of weight 1/2 (advantage 0) carries no gradient.
    torch.testing.assert_close(grad_at_old(0.8), -grad_at_old(0.2))
    torch.testing.assert_close(grad_at_old(1.0), -grad_at_old(0.0))
    assert float(grad_at_old(0.5).abs().max()) == 0.0
    assert float(grad_at_old(1.0).abs().max()) > 0.0


def test_nft_weight_maps_clipped_advantages_onto_the_unit_interval():
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    want = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    torch.testing.assert_close(nft_reward_weight(adv, 5.0), want)
    n = NftConfig()  # the public recipe's old-model decay (decay_type 1)
    assert [n.decay(k) for k in (0, 100, 500, 10_000)] == [0.0, 0.1, 0.5, 0.5]


# ------------------------------------------------------------------ KL conventions


def _official_kl(mean_new, mean_old, sigma, sigma_next, eta):
    # The official Flow-DPPO code's KL as the issue describes it, written out directly.
    s = min(float(sigma), 0.99)
    std = eta * math.sqrt(s / (1 - s)) * math.sqrt(float(sigma) - float(sigma_next))
    old = mean_old.to(torch.bfloat16).float()
    return ((mean_new - old) ** 2).mean(dim=tuple(range(1, mean_new.dim()))) / (2 * std**2)


@pytest.mark.parametrize("kind", ["flow", "cps"])
def test_official_kl_convention_reproduces_the_official_formula(kind):
    sigmas = schedule.sigma_schedule(10, 3.0)  # the 10-step SD3 schedule
    spec = SamplerSpec(kind, sigmas, 0.7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 8, 8, generator=g)
    v_old = torch.randn(4, 16, 8, 8, generator=g)
    v_new = v_old + 1e-3 * torch.randn(4, 16, 8, 8, generator=g)
    for k in (0, 2):  # the sigma = 1 step and an interior one
        mean_old, _ = spec.transition(k, v_old, x)
        out = spec.step(k, kind, v_new, x, prev_sample=mean_old)
        official = _step_kl(out, mean_old, spec, k, "official")
        torch.testing.assert_close(
            official, _official_kl(out.mean, mean_old, sigmas[k], sigmas[k + 1], 0.7)
        )
        exact = _step_kl(out, mean_old, spec, k, "exact")
        torch.testing.assert_close(exact, kernels.gaussian_kl(out.mean, mean_old, out.std))
    if kind == "flow":
        # At sigma = 1 with float32 means the official KL is 0.28 x the exact one here.
        mean_old, _ = spec.transition(0, v_old, x)
        out = spec.step(0, kind, v_new, x, prev_sample=mean_old)
        std_official = kernels.official_flow_std(sigmas[0], sigmas[1], 0.7, out.mean)
        factor = float(out.std.reshape(()) ** 2 / std_official.reshape(()) ** 2)
        assert factor == pytest.approx(0.281, abs=0.002)


# ------------------------------------------------------------------ bad input


def test_unknown_algorithm_lists_the_six_methods():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm=ppo"])
    for name in ("dppo", "grpo", "cps", "guard", "nft", "dppo+cps"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["algorithm=dppo", "objective.guard_clip_range=1e-5"], "objective.guard_clip_range"),
        (["algorithm=grpo", "nft.beta=0.1"], "nft.beta"),
        (["algorithm=nft", "objective.dppo_threshold=1e-6"], "objective.dppo_threshold"),
        (["algorithm=nft", "objective.kl_convention=official"], "objective.kl_convention"),
        (["algorithm=guard", "objective.clip_range_per_step=1.0"], "objective.clip_range"),
        (["algorithm=grpo", "objective.dppo_mask=kl"], "objective.dppo_mask"),
        (["algorithm=guard", "sampler.score=cps"], "sampler.score"),
        (["algorithm=guard", "sampler.log_prob_reduce=sum"], "sampler.log_prob_reduce"),
        (["algorithm=guard+ode"], "unknown algorithm"),
    ],
)
def test_options_of_another_algorithm_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("+", r"\+")):
        load_config(None, overrides)


# ------------------------------------------------------------------ training and resume


@pytest.mark.parametrize("algorithm", ["guard", "nft"])
def test_two_iterations_and_a_bit_exact_resume(tmp_path, toy_overrides, algorithm, monkeypatch):
    extra = ["train.iterations=3", "log.eval_every=3", "log.eval_samples_per_prompt=2"]
    cfg = load_config(None, [*toy_overrides, f"algorithm={algorithm}", *extra])
    full = Trainer(cfg, tmp_path / "full").train()
    rows = metrics_of(tmp_path / "full")
    assert all(r["grad_norm"] > 0 for r in rows)
    if algorithm == "nft":
        # The old model's velocity costs one forward per trained forward, counted apart.
        last = rows[-1]
        assert last["forward_samples/update_old"] == last["forward_samples/update"] > 0
        assert 0 <= last["nft/weight_mean"] <= 1 and "nft/old_decay" in last
    else:
        assert all(0 <= r["clip_fraction"] <= 1 and r["kl_mean"] >= 0 for r in rows)
        assert rows[0]["first_update_ratio_dev"] < 1e-5
    crash_after_checkpoint(monkeypatch, lambda: Trainer(cfg, tmp_path / "crashed"), 2)
    resumed = Trainer(cfg, tmp_path / "crashed", resume=True).train()
    stamp = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    again = metrics_of(tmp_path / "crashed")
    assert [{k: v for k, v in r.items() if not k.startswith("time/")} for r in again] == stamp
    assert resumed["after"] == full["after"]
    digest = checkpoint_digests(tmp_path, ("full", "crashed"), 3)
    assert digest[0] == digest[1]


def test_an_experiment_shares_its_knobs_and_each_method_keeps_its_own(tmp_path):
    from flowdppo.compare.experiment import load_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(
        "objective: {dppo_threshold_per_step: 6.5e-3, clip_range_per_step: 6.5, "
        "guard_clip_range: 1.0e-5}\n"
        "nft: {beta: 0.1}\n"
        "compare: {algorithms: [dppo, grpo, cps, guard, nft, dppo+cps], seeds: 1}\n"
    )
    runs = {r.algorithm: r.config for r in load_experiment(path).plan(tmp_path / "out")}
    assert list(runs) == ["dppo", "grpo", "cps", "guard", "nft", "dppo+cps"]
    assert runs["dppo"].objective.dppo_threshold_per_step == 6.5e-3
    assert runs["grpo"].objective.clip_range_per_step == 6.5
    assert runs["guard"].objective.guard_clip_range == 1e-5
    assert runs["guard"].objective.clip_range_per_step is None
    assert runs["nft"].nft.beta == 0.1 and runs["nft"].objective.dppo_threshold_per_step is None
    assert runs["cps"].sampler.eta == 0.8 and runs["cps"].sampler.score == "cps"


def test_cps_defaults_are_the_published_recipes():
    from flowdppo.config import resolve_trust_region

    def resolved(algorithm):
        return resolve_trust_region(load_config(None, [f"algorithm={algorithm}"]), 64)

    cps = resolved("cps")  # Flow-GRPO's CPS recipe: eta 0.8, -(x' - mean)^2, clip 1e-5
    assert (cps.sampler.eta, cps.sampler.score) == (0.8, "cps")
    assert cps.objective.clip_range_per_step == pytest.approx(65536 * 1e-5)
    assert cps.objective.clip_range == pytest.approx(65536 * 1e-5 / 64)
    # The paper's delta = 1e-6 with the CPS kernel, 1e-7 without (both at d = 65,536).
    assert resolved("dppo+cps").objective.dppo_threshold_per_step == pytest.approx(65536e-6)
    assert resolved("dppo").objective.dppo_threshold_per_step == pytest.approx(65536e-7)
    grpo = resolved("grpo")
    assert (grpo.sampler.eta, grpo.sampler.score) == (0.7, "gaussian")
