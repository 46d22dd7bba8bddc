"""Deterministic ODE solvers for the steps of a trajectory that explore nothing.

``euler`` is the ODE kernel of :mod:`flowdppo.kernels` (``x + dt·v``). ``dpm2`` is the
second-order multistep DPM-Solver++ (2M) that DiffusionNFT's official trainer samples with
(``sample.solver = "dpm2"``), written for the rectified-flow path ``x_σ = (1 − σ)·x0 + σ·ε``
(docs/method.md, "ODE solvers"):

* data prediction ``x̂0 = x − σ·v`` and log-SNR ``λ = log((1 − σ)/σ)``;
* from ``σ`` to ``σ'`` with ``h = λ' − λ`` and the previous prediction ``x̂0_prev`` made at
  ``σ_prev`` (``h_prev = λ − λ_prev``, ``r = h_prev / h``), the 2M update
  ``x' = (σ'/σ)·x + (1 − σ'/σ)·(x̂0 + (x̂0 − x̂0_prev)/(2r))``, which is the Euler step plus
  ``(1 − σ'/σ)·h/(2·h_prev)·(x̂0 − x̂0_prev)``;
* first-order (exactly the Euler step) where the multistep formula has nothing to use: with
  no history (the first step, or the first after a stochastic step), when the history was
  made at ``σ = 1`` (``λ = −∞``: the official formula's correction is 0 there), and on a
  step to ``σ' = 0`` (``λ' = +∞``; the official solver's ``lower_order_final``).

A stochastic step moves the sample off the ODE trajectory the history was made on, so the
history restarts after one: the caller passes ``history=None`` to the next solver step.

Every step runs in float32 like the kernels; the step coefficients are computed in float64
from the schedule's float32 σ values, as the official solver does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowdppo import kernels

SOLVERS = ("euler", "dpm2")


@dataclass(frozen=True)
class History:
    """What a multistep solver keeps from its last step: the noise level and the data
    prediction made there."""

    sigma: float
    x0: torch.Tensor


def _scalar(value: float | torch.Tensor, name: str) -> float:
    t = torch.as_tensor(value)
    if t.numel() != 1:
        raise ValueError(
            f"the ODE solvers take one {name} for the whole batch, got shape {tuple(t.shape)}"
        )
    return float(t.reshape(()))


def _log_snr(sigma: float) -> float:
    return math.log1p(-sigma) - math.log(sigma)


def dpm2_coefficient(sigma_prev: float, sigma: float, sigma_next: float) -> float | None:
    """The weight of ``x̂0 − x̂0_prev`` in a 2M step (``None``: the step is first-order)."""
    if not (1 > sigma_prev > sigma >= sigma_next > 0):
        return None
    h = _log_snr(sigma_next) - _log_snr(sigma)
    h_prev = _log_snr(sigma) - _log_snr(sigma_prev)
    return (1 - sigma_next / sigma) * h / (2 * h_prev)


def ode_step(
    solver: str,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    history: History | None = None,
) -> tuple[torch.Tensor, History | None]:
    """One deterministic step from ``sigma`` to ``sigma_next``; returns the next sample and
    the history for the next step (``None`` for ``euler``, which keeps none)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    # The Euler step is the ODE kernel's own arithmetic, so euler and every first-order
    # dpm2 step give the same numbers as the kernels.
    mean, _ = kernels.transition("ode", velocity, sample, sigma, sigma_next, 0.0)
    if solver == "euler":
        return mean, None
    s, s_next = _scalar(sigma, "sigma"), _scalar(sigma_next, "sigma_next")
    x0 = sample.float() - torch.as_tensor(sigma, dtype=torch.float32) * velocity.float()
    c = None if history is None else dpm2_coefficient(history.sigma, s, s_next)
    if c is not None:
        if history.x0.shape != x0.shape:
            raise ValueError(
                f"the solver's history has shape {tuple(history.x0.shape)}, the sample "
                f"{tuple(x0.shape)}: pass history=None when the batch changes"
            )
        mean = mean + c * (x0 - history.x0)
    return mean, History(s, x0)
