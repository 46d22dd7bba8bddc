import math

import pytest
import torch

from flowdppo import kernels
from flowdppo.kernels import gaussian_kl, gaussian_log_prob, step, transition
from flowdppo.schedule import sigma_schedule

STOCHASTIC = ["flow", "cps", "dance"]


def _state(b=6, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)


def test_exact_kl_equals_monte_carlo_and_log_ratio_moments():
    # Old and new policy differ by a fixed mean shift d; x' ~ pi_old.
    g = torch.Generator().manual_seed(0)
    dim, n, std = 64, 200_000, 0.3
    mean_old = torch.zeros(1, dim)
    d = 0.05 * torch.randn(1, dim, generator=g)
    mean_new = mean_old + d
    x = mean_old + std * torch.randn(n, dim, generator=g)
    logp_old = gaussian_log_prob(x, mean_old.expand(n, dim), std, reduce="sum")
    logp_new = gaussian_log_prob(x, mean_new.expand(n, dim), std, reduce="sum")
    exact = gaussian_kl(mean_old, mean_new, std, reduce="sum")[0]
    log_ratio = logp_new - logp_old
    mc = (logp_old - logp_new).mean()
    # Standard error of the MC mean is sqrt(2D / n).
    tol = 5 * math.sqrt(2 * exact.item() / n)
    assert abs(mc.item() - exact.item()) < tol
    assert abs(log_ratio.mean().item() + exact.item()) < tol
    assert log_ratio.var().item() == pytest.approx(2 * exact.item(), rel=0.02)
    # Mean reduction is the summed KL over the element count.
    mean_red = gaussian_kl(mean_old, mean_new, std)[0]
    assert mean_red.item() == pytest.approx(exact.item() / dim, rel=1e-5)


def test_kl_is_symmetric_in_the_means():
    a, b = _state()
    assert torch.allclose(gaussian_kl(a, b, 0.5), gaussian_kl(b, a, 0.5))


@pytest.mark.parametrize("kind", STOCHASTIC)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_replay_rescores_to_the_same_log_prob(kind, reduce):
    x, v = _state()
    sigmas = torch.full((6,), 0.8), torch.full((6,), 0.7)
    g = torch.Generator().manual_seed(1)
    out = step(kind, v, x, *sigmas, 0.7, generator=g, reduce=reduce, sigma_max=0.9)
    again = step(kind, v, x, *sigmas, 0.7, prev_sample=out.prev_sample, reduce=reduce)
    ratio = torch.exp(again.log_prob - out.log_prob)
    assert torch.equal(again.log_prob, out.log_prob)
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert torch.equal(again.mean, out.mean)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_replay_through_a_model_gives_ratio_one(kind):
    # A real network evaluated twice (sampling, then replay) on the same state.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(17, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16))
    x = torch.randn(8, 16)
    sigma = torch.rand(8) * 0.8 + 0.1
    sigma_next = sigma - 0.05

    def velocity(x, s):
        return net(torch.cat([x, s[:, None]], dim=1))

    with torch.no_grad():
        out = step(
            kind,
            velocity(x, sigma),
            x,
            sigma,
            sigma_next,
            0.7,
            generator=torch.Generator().manual_seed(3),
        )
    replay = step(kind, velocity(x, sigma), x, sigma, sigma_next, 0.7, prev_sample=out.prev_sample)
    ratio = torch.exp(replay.log_prob - out.log_prob)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)
    assert replay.log_prob.requires_grad


def test_flow_sde_with_eta_to_zero_and_cps_with_eta_zero_are_euler():
    x, v = _state()
    euler = x + (torch.tensor(0.55) - torch.tensor(0.6)) * v  # dt in float32, as the kernel
    for eta in (1e-4, 1e-6):
        mean, std = transition("flow", v, x, 0.6, 0.55, eta)
        assert torch.allclose(mean, euler, atol=1e-5)
        assert float(std) < 1e-4
    mean, std = transition("cps", v, x, 0.6, 0.55, 0.0)
    assert torch.allclose(mean, euler, atol=1e-5)
    assert float(std) == 0
    mean, _ = transition("ode", v, x, 0.6, 0.55, 0.7)
    assert torch.equal(mean, euler)
    assert step("ode", v, x, 0.6, 0.55, 0.0).log_prob is None


def test_flow_kernel_at_sigma_one_uses_sigma_max():
    x, v = _state()
    mean, std = transition("flow", v, x, 1.0, 0.9, 0.7, sigma_max=0.9)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all() and float(std) > 0
    with pytest.raises(ValueError, match="sigma_max"):
        transition("flow", v, x, 1.0, 0.9, 0.7)


def _gaussian_velocity(x, sigma, m, s):
    # Rectified flow from N(0, 1) noise to N(m, s^2) data: v = E[eps - x0 | x_sigma = x].
    a = 1 - sigma
    var = a**2 * s**2 + sigma**2
    return (sigma - a * s**2) / var * (x - a * m) - m


def _sample(kind, eta, m, s, n=40_000, steps=200, sde_steps=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, m.numel(), generator=g)
    sigmas = sigma_schedule(steps)
    for k in range(steps):
        v = _gaussian_velocity(x, sigmas[k], m, s)
        use = kind if sde_steps is None or k in sde_steps else "ode"
        x = step(
            use, v, x, sigmas[k], sigmas[k + 1], eta, generator=g, sigma_max=float(sigmas[1])
        ).prev_sample
    return x


@pytest.mark.parametrize("kind,eta", [("ode", 0.0), ("flow", 0.7), ("dance", 0.3)])
def test_marginals_are_preserved_on_a_gaussian_toy(kind, eta):
    m, s = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 2.0])
    x = _sample(kind, eta, m, s)
    assert torch.allclose(x.mean(0), m, atol=0.05)
    assert torch.allclose(x.std(0), s, rtol=0.03)


def test_cps_preserves_the_mean_on_a_gaussian_toy():
    m, s = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 2.0])
    assert torch.allclose(_sample("cps", 0.7, m, s).mean(0), m, atol=0.05)


def test_cps_preserves_the_noise_coefficient_at_every_step():
    # CPS keeps x_k = (1 - sigma_k) x0 + sigma_k * noise with unit noise exactly when x0 is
    # predicted exactly (a point-mass target). With a spread-out target it re-draws part of
    # the noise around a posterior-mean x0 at a fixed angle, whatever the step size, so each
    # stochastic step narrows the result a little (measured on the toy above: std 0.42
    # instead of 0.50 with CPS on all 200 steps, 0.487 with CPS on 3 of them): a property of
    # the kernel, not a bug.
    m, s = torch.tensor([1.5, -0.5]), torch.tensor([1e-4, 1e-4])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, 2, generator=g)
    sigmas = sigma_schedule(50)
    for k in range(50):
        v = _gaussian_velocity(x, sigmas[k], m, s)
        x = step("cps", v, x, sigmas[k], sigmas[k + 1], 0.7, generator=g).prev_sample
        noise = (x - (1 - sigmas[k + 1]) * m) / max(float(sigmas[k + 1]), 1e-12)
        if k < 49:
            assert torch.allclose(noise.std(0), torch.ones(2), rtol=0.03)
            assert torch.allclose(noise.mean(0), torch.zeros(2), atol=0.03)
    assert torch.allclose(x.mean(0), m, atol=1e-3)


@pytest.mark.parametrize("kind", kernels.KINDS)
def test_bf16_inputs_compute_in_float32(kind):
    x, v = _state()
    out = step(
        kind,
        v.bfloat16(),
        x.bfloat16(),
        torch.tensor([0.8] * 6, dtype=torch.float64),
        0.7,
        0.7,
        generator=torch.Generator().manual_seed(0),
    )
    ref = step(
        kind,
        v.bfloat16().float(),
        x.bfloat16().float(),
        0.8,
        0.7,
        0.7,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.mean.dtype == torch.float32 and out.prev_sample.dtype == torch.float32
    assert torch.equal(out.mean, ref.mean)
    if kind != "ode":
        assert out.log_prob.dtype == torch.float32
        assert torch.equal(out.log_prob, ref.log_prob)


def test_five_dimensional_video_latents():
    x, v = _state(b=2, shape=(4, 3, 5, 6))
    out = step("flow", v, x, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.shape == x.shape and out.log_prob.shape == (2,)
    assert gaussian_kl(out.mean, x, out.std).shape == (2,)


def test_per_sample_sigmas_match_scalar_sigmas():
    x, v = _state()
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    mean, std = transition("flow", v, x, s, s - 0.1, 0.7)
    for i in range(6):
        mi, si = transition("flow", v[i : i + 1], x[i : i + 1], float(s[i]), float(s[i]) - 0.1, 0.7)
        assert torch.allclose(mean[i : i + 1], mi, atol=1e-6)
        assert torch.allclose(std[i].squeeze(), si.squeeze(), atol=1e-7)


def test_cps_unnormalised_score_option():
    x, v = _state()
    out = step("cps", v, x, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(0), score="cps")
    assert torch.allclose(out.log_prob, -((out.prev_sample - out.mean) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, v: transition("sde", v, x, 0.5, 0.4, 0.7), "unknown kernel"),
        (lambda x, v: transition("flow", v, x, 0.5, 0.4, -0.1), "eta must be >= 0"),
        (lambda x, v: transition("flow", v, x, 0.4, 0.5, 0.7), "sigma >= sigma_next"),
        (lambda x, v: transition("flow", v[:, :2], x, 0.5, 0.4, 0.7), "does not match"),
        (lambda x, v: transition("cps", v, x, 0.5, 0.4, 1.5), "eta in \\[0, 1\\]"),
        (lambda x, v: transition("flow", v, x, torch.ones(3), 0.4, 0.7), "per-sample tensor"),
        (lambda x, v: gaussian_log_prob(x, v, 0.0), "std must be > 0"),
        (lambda x, v: gaussian_kl(x, v, 0.5, reduce="max"), "reduce must be"),
        (lambda x, v: step("flow", v, x, 0.5, 0.4, 0.7, prev_sample=x[:1]), "prev_sample shape"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match):
    x, v = _state()
    with pytest.raises(ValueError, match=match):
        call(x, v)
