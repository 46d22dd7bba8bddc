"""Transition kernels of a flow-matching sampler: one denoising step as a Gaussian policy.

Every kernel maps (velocity, sample, sigma -> sigma_next) to a mean and a standard deviation
(docs/method.md). Sampling and replay share :func:`step`, so the first replay of a rollout
scores each stored transition with exactly the arithmetic that produced it: the ratio is 1
up to float rounding, and any drift from that is a real change of the policy.

All math runs in float32 whatever the input dtype: bf16 loses the tiny mean differences the
KL is made of, and a float64 sigma would score a float32 rollout with different numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("ode", "flow", "cps", "dance")
REDUCTIONS = ("mean", "sum")
SCORES = ("gaussian", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """One transition: the next sample, its log-prob under the kernel, mean and std."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float or per-sample tensor as float32 shaped [B, 1, ..., 1] (or a 0-d tensor).

    A single value stays a 0-d CPU tensor (torch treats it as a scalar next to a GPU
    tensor), so checking it and computing the step's std never wait on the GPU."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.dim() == 0:
        return t.cpu()
    t = t.to(like.device)
    if t.dim() == 1 and t.shape[0] in (1, like.shape[0]):
        return t.view(-1, *([1] * (like.dim() - 1)))
    if t.dim() == like.dim() and all(s == 1 for s in t.shape[1:]):
        return t
    raise ValueError(
        f"{name} must be a float or a per-sample tensor of shape [{like.shape[0]}], "
        f"got shape {tuple(t.shape)}"
    )


def _check(kind: str, velocity: torch.Tensor, sample: torch.Tensor, eta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kernel {kind!r}; choose one of {', '.join(KINDS)}")
    if velocity.shape != sample.shape:
        raise ValueError(
            f"velocity shape {tuple(velocity.shape)} does not match sample shape "
            f"{tuple(sample.shape)}"
        )
    if not eta >= 0:  # also rejects NaN
        raise ValueError(f"eta must be >= 0, got {eta}")
    if kind == "cps" and eta > 1:
        raise ValueError(f"the cps kernel needs eta in [0, 1] (noise angle eta*pi/2), got {eta}")


def transition(
    kind: str,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    eta: float,
    *,
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``x_next | x`` for one step of the ``kind`` kernel.

    ``sigma_max`` is the first schedule entry below 1; the flow kernel needs it when
    ``sigma == 1`` (where ``sigma / (1 - sigma)`` is infinite). ``std`` broadcasts against
    the mean (shape [B, 1, ..., 1] or 0-d).
    """
    _check(kind, velocity, sample, eta)
    x = sample.float()
    v = velocity.float()
    s = _per_sample(sigma, x, "sigma")
    s_next = _per_sample(sigma_next, x, "sigma_next")
    if bool((s_next > s).any()) or bool((s > 1).any()) or bool((s_next < 0).any()):
        raise ValueError(
            "a denoising step needs 1 >= sigma >= sigma_next >= 0 "
            f"(got sigma={sigma}, sigma_next={sigma_next})"
        )
    dt = s_next - s

    if kind == "ode" or (eta == 0 and kind != "cps"):
        return x + dt * v, torch.zeros_like(s)

    if kind == "cps":
        angle = eta * math.pi / 2
        x0 = x - s * v
        x1 = x + (1 - s) * v
        mean = (1 - s_next) * x0 + s_next * math.cos(angle) * x1
        return mean, s_next * math.sin(angle)

    if bool((s <= 0).any()):
        raise ValueError(f"the {kind} kernel needs sigma > 0 (it divides by sigma)")
    if kind == "flow":
        at_one = s >= 1
        if bool(at_one.any()):
            if sigma_max is None:
                raise ValueError(
                    "the flow kernel at sigma = 1 needs sigma_max (the first schedule entry "
                    "below 1), because sigma / (1 - sigma) is infinite there"
                )
            if not 0 < sigma_max < 1:
                raise ValueError(f"sigma_max must be in (0, 1), got {sigma_max}")
        # Only the denominator is replaced at sigma = 1, as in the published Flow-SDE.
        denom = 1 - torch.where(at_one, torch.full_like(s, sigma_max or 0.5), s)
        noise = eta * torch.sqrt(s / denom)
    else:  # dance: constant noise scale
        noise = torch.full_like(s, eta)

    mean = x * (1 + noise**2 / (2 * s) * dt) + v * (1 + noise**2 * (1 - s) / (2 * s)) * dt
    return mean, noise * torch.sqrt(-dt)


def _reduce(t: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    dims = tuple(range(1, t.dim()))
    if not dims:
        return t
    return t.mean(dim=dims) if reduce == "mean" else t.sum(dim=dims)


def _std(std: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    # One value stays on the CPU (see _per_sample); per-sample stds go to the device.
    t = torch.as_tensor(std, dtype=torch.float32)
    return t.cpu() if t.dim() == 0 else t.to(like.device)


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduce: str = "mean"
) -> torch.Tensor:
    """Per-sample log-density of ``x`` under N(mean, std^2 I), reduced over all but dim 0."""
    if x.shape != mean.shape:
        raise ValueError(f"x shape {tuple(x.shape)} does not match mean {tuple(mean.shape)}")
    std = _std(std, mean)
    if bool((std <= 0).any()):
        raise ValueError("std must be > 0 for a log-prob (the ODE kernel has none)")
    x, mean = x.float(), mean.float()
    elem = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return _reduce(elem.expand_as(x), reduce)


def gaussian_kl(
    mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor | float, reduce: str = "mean"
) -> torch.Tensor:
    """Exact KL between N(mean_p, std^2 I) and N(mean_q, std^2 I), per sample.

    Symmetric in the two means: ``||mean_p - mean_q||^2 / (2 std^2)``.
    """
    if mean_p.shape != mean_q.shape:
        raise ValueError(f"mean shapes differ: {tuple(mean_p.shape)} vs {tuple(mean_q.shape)}")
    std = _std(std, mean_p)
    if bool((std <= 0).any()):
        raise ValueError("std must be > 0 for a KL between Gaussians")
    elem = (mean_p.float() - mean_q.float()) ** 2 / (2 * std**2)
    return _reduce(elem, reduce)


def step(
    kind: str,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    eta: float,
    *,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_max: float | None = None,
    reduce: str = "mean",
    score: str = "gaussian",
) -> StepOutput:
    """Take (``prev_sample=None``) or re-score (replay) one transition.

    ``score="cps"`` scores with the unnormalised ``-(x' - mean)^2`` (the CPS authors'
    choice; it is not a log-density and has no std in it).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    mean, std = transition(kind, velocity, sample, sigma, sigma_next, eta, sigma_max=sigma_max)
    stochastic = kind != "ode" and bool((std > 0).all())
    if prev_sample is None:
        if stochastic:
            # Drawn where the generator lives (the trainer's is on the CPU), then moved: a
            # CUDA model samples the same noise as a CPU one from the same seed.
            where = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=where, dtype=torch.float32)
            noise = noise.to(mean.device)
            prev_sample = mean + std * noise
        else:
            prev_sample = mean
    elif prev_sample.shape != mean.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} does not match {tuple(mean.shape)}"
        )
    prev_sample = prev_sample.float()
    if not stochastic:
        return StepOutput(prev_sample, None, mean, std)
    if score == "cps":
        log_prob = _reduce(-((prev_sample.detach() - mean) ** 2), reduce)
    else:
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduce)
    return StepOutput(prev_sample, log_prob, mean, std)


#: The official Flow-DPPO code clamps sigma at this value when it computes the noise std
#: of its KL (docs/method.md, "Conventions").
OFFICIAL_SIGMA_CLAMP = 0.99


def official_flow_std(
    sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, eta: float, like: torch.Tensor
) -> torch.Tensor:
    """The noise std the official Flow-DPPO code uses for its KL, with any kernel: the
    Flow-SDE std ``eta * sqrt(s / (1 - s)) * sqrt(sigma - sigma_next)`` with
    ``s = min(sigma, 0.99)`` (the exact Flow-SDE std replaces only the denominator at
    sigma = 1, by the first schedule entry below 1). Shaped to broadcast against ``like``."""
    s = _per_sample(sigma, like, "sigma")
    s_next = _per_sample(sigma_next, like, "sigma_next")
    clamped = torch.clamp(s, max=OFFICIAL_SIGMA_CLAMP)
    return eta * torch.sqrt(clamped / (1 - clamped)) * torch.sqrt(s - s_next)
