"""The sigma schedule and the choice of exploration (SDE) steps."""

from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift ``s sigma / (1 + (s - 1) sigma)``; keeps 0 and 1 fixed (SD3 uses s = 3)."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_schedule(
    num_steps: int, shift: float = 1.0, *, num_train_timesteps: int | None = None
) -> torch.Tensor:
    """``num_steps + 1`` noise levels from 1 down to 0 (float32).

    By default the levels are evenly spaced in [1, 0] before the shift. With
    ``num_train_timesteps`` the spacing is that of diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (the last level before 0 is the shifted
    ``1 / num_train_timesteps``, and the shift is applied to the spaced values), so a
    real model is sampled on exactly its pipeline's schedule.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_train_timesteps is None:
        base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return shift_sigmas(base, shift).float()
    sigma_min = float(shift_sigmas(torch.tensor(1.0 / num_train_timesteps), shift))
    base = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    sigmas = shift_sigmas(base, shift).float()
    return torch.cat([sigmas, torch.zeros(1)])


def sde_window_steps(num_steps: int, window: tuple[float, float]) -> list[int]:
    """Step indices whose start lies in the fraction window ``[lo, hi)`` of the schedule."""
    lo, hi = window
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"SDE window must satisfy 0 <= lo < hi <= 1, got {window}")
    return [k for k in range(num_steps) if lo <= k / num_steps < hi]


def choose_sde_steps(
    num_steps: int,
    num_sde_steps: int,
    window: tuple[float, float] = (0.0, 0.5),
    generator: torch.Generator | None = None,
) -> list[int]:
    """Draw ``num_sde_steps`` distinct steps from the window (sorted); the rest run ODE.

    The published recipe draws 3 of the first half of 10 steps, anew every iteration.
    """
    candidates = sde_window_steps(num_steps, window)
    if not 1 <= num_sde_steps <= len(candidates):
        raise ValueError(
            f"cannot draw {num_sde_steps} SDE steps from window {window} of {num_steps} steps "
            f"({len(candidates)} candidates: {candidates})"
        )
    pick = torch.randperm(len(candidates), generator=generator)[:num_sde_steps]
    return sorted(candidates[i] for i in pick.tolist())


def step_plan(num_steps: int, sde_steps: list[int], ode_stride: int = 1) -> list[tuple[int, int]]:
    """The sampler's steps as ``(a, b)``: from level ``a`` of the schedule to level ``b``.

    Every SDE step ``k`` is ``(k, k + 1)``, exactly the training schedule's transition.
    Each stretch of deterministic steps between them (and before the first, after the
    last) lands on every ``ode_stride``-th level from the stretch's start and always on its
    end, so a stretch of ``m`` steps costs ``ceil(m / ode_stride)`` forwards (the last one
    may be shorter). ``ode_stride = 1`` is every level: ``(k, k + 1)`` for all ``k``.
    """
    if ode_stride < 1:
        raise ValueError(f"ode_stride must be >= 1, got {ode_stride}")
    sde = set(sde_steps)
    if not sde <= set(range(num_steps)):
        raise ValueError(f"SDE steps {sorted(sde)} must lie in 0..{num_steps - 1}")
    plan = []
    a = 0
    while a < num_steps:
        if a in sde:
            plan.append((a, a + 1))
            a += 1
            continue
        end = next((k for k in range(a, num_steps) if k in sde), num_steps)
        plan += [(k, min(k + ode_stride, end)) for k in range(a, end, ode_stride)]
        a = end
    return plan
