"""Policy objectives: Flow-GRPO / Flow-CPS ratio clipping, the Flow-DPPO divergence mask,
GRPO-Guard's normalised ratio and DiffusionNFT's forward-process loss (docs/method.md).

Each function returns element-wise losses (one per trained step of one sample; the caller
reduces) and a dict of detached scalar statistics. The likelihood objectives differ only
here: the trainer hands every one of them the same log-probs, means and advantages.
DiffusionNFT needs no likelihood: it takes velocities on noised clean samples instead.
"""

from __future__ import annotations

import math

import torch

from flowdppo.kernels import gaussian_kl

MASKS = ("asymmetric", "kl", "first_order")


# Ratio statistics saturate at exp(+-80) and are computed in float64, so one runaway
# ratio shows as a huge number instead of turning the whole log line into inf / NaN.
_STATS_LOG_RATIO_LIMIT = 80.0


def _ratio_stats(log_ratio: torch.Tensor) -> dict[str, torch.Tensor]:
    limit = _STATS_LOG_RATIO_LIMIT
    ratio = torch.exp(log_ratio.detach().double().clamp(-limit, limit))
    stats = {
        "ratio_mean": ratio.mean(),
        "ratio_std": ratio.std(unbiased=False),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
    }
    return {k: v.float() for k, v in stats.items()}


def _grad_blocked_fraction(
    removed: torch.Tensor, advantages: torch.Tensor, ratio: torch.Tensor
) -> torch.Tensor:
    """Fraction of terms whose gradient is exactly zero: removed by the trust region, or
    carrying no signal in any objective (zero advantage, or a ratio that underflows to 0)."""
    return (removed | (advantages == 0) | (ratio == 0)).float().mean()


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"element-wise inputs must share one shape, got {shapes}")


def _clipped_surrogate(
    log_ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``max(-A r, -A clip(r, 1 - low, 1 + high))`` with ``r = exp(log_ratio)``."""
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = _ratio_stats(log_ratio)
        below, above = ratio < 1.0 - low, ratio > 1.0 + high
        # clip_fraction is the window fraction: every ratio outside it, including the terms
        # whose unclipped branch wins the max and so keep their gradient. Only a ratio past
        # the window in the advantage's own direction loses it.
        stats["clip_fraction"] = (below | above).float().mean()
        removed = ((adv > 0) & above) | ((adv < 0) & below)
        stats["grad_blocked_fraction"] = _grad_blocked_fraction(removed, adv, ratio)
    return loss, stats


def _clip_ranges(clip_range: float, clip_range_high: float | None) -> float:
    high = clip_range if clip_range_high is None else clip_range_high
    if not (clip_range > 0 and high > 0):
        raise ValueError(f"clip ranges must be > 0, got {clip_range} and {high}")
    return high


def grpo_clip_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO ratio clipping: ``max(-A r, -A clip(r, 1 - eps, 1 + eps_high))``.

    With element-mean log-probs the published clip range is 1e-4.
    """
    _check_same_shape(logp_new=logp_new, logp_old=logp_old, advantages=advantages)
    high = _clip_ranges(clip_range, clip_range_high)
    log_ratio = logp_new.float() - logp_old.float()
    return _clipped_surrogate(log_ratio, advantages.float(), clip_range, high)


def guard_log_ratio(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    mean_new: torch.Tensor,
    mean_old: torch.Tensor,
    std: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-Guard's normalised log-ratio ``std * (log r + D)`` and the KL ``D``.

    ``log r`` is the element-mean log-ratio of one step, ``D = mean((mu_new - mu_old)^2) /
    (2 std^2)`` the exact element-mean KL (the ratio's mean shift: ``E[log r] = -D`` on
    samples of the old policy) and ``std`` the kernel's noise std. Adding ``D`` centres the
    log-ratio and the factor ``std`` removes its ``1 / std`` scale, so on old-policy samples
    the result is ``mean(xi * (mu_new - mu_old))``: mean 0 and variance
    ``mean((mu_new - mu_old)^2) / d`` at every step, whatever the step's noise level.
    ``D`` keeps its gradient, as in the method's public code.
    """
    kl = gaussian_kl(mean_new, mean_old.detach(), std, "mean")
    log_ratio = logp_new.float() - logp_old.float()
    scale = torch.as_tensor(std, dtype=torch.float32, device=log_ratio.device).reshape(-1)
    if scale.numel() not in (1, log_ratio.numel()):
        raise ValueError(f"std must be one value or one per sample, got {scale.numel()} values")
    return (log_ratio + kl) * scale, kl


def guard_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    mean_new: torch.Tensor,
    mean_old: torch.Tensor,
    std: torch.Tensor | float,
    dt: float,
    advantages: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-Guard (Wang et al., arXiv 2510.22319): ratio clipping on the normalised ratio
    ``exp(std * (log r + D))`` (:func:`guard_log_ratio`), each step's loss reweighted by
    ``1 / |dt|`` so that every step's gradient has the same scale.

    Defined for element-mean Gaussian log-probs; ``dt`` is the step's ``sigma' - sigma``.
    """
    _check_same_shape(logp_new=logp_new, logp_old=logp_old, advantages=advantages)
    high = _clip_ranges(clip_range, clip_range_high)
    if not (math.isfinite(dt) and dt != 0):
        raise ValueError(f"dt must be a finite non-zero step size, got {dt}")
    log_ratio, kl = guard_log_ratio(logp_new, logp_old, mean_new, mean_old, std)
    if kl.shape != log_ratio.shape:
        raise ValueError(
            f"means give a KL of shape {tuple(kl.shape)}, log-probs have "
            f"{tuple(log_ratio.shape)}: pass one mean per log-prob"
        )
    loss, stats = _clipped_surrogate(log_ratio, advantages.float(), clip_range, high)
    with torch.no_grad():
        stats["kl_mean"], stats["kl_max"] = kl.detach().mean(), kl.detach().max()
    return loss / abs(dt), stats


def dppo_mask(
    log_ratio: torch.Tensor,
    kl: torch.Tensor,
    advantages: torch.Tensor,
    threshold: float,
    mask: str = "asymmetric",
) -> torch.Tensor:
    """Boolean tensor, True where the update is blocked.

    ``asymmetric`` (Flow-DPPO): outside the trusted zone (``kl > threshold``) and pushing
    further in the advantage's direction (``A (r - 1) > 0``, tested as ``A log r > 0`` so a
    huge ratio cannot overflow). ``kl``: the ablation without the asymmetry, blocking every
    step outside the zone. ``first_order``: the predictive variant, blocking when
    ``A (log r - kl) > 0`` outside the zone.
    """
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    outside = kl > threshold
    if mask == "kl":
        return outside
    drift = log_ratio if mask == "asymmetric" else log_ratio - kl
    return outside & (advantages * drift > 0)


def dppo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    mean_new: torch.Tensor,
    mean_old: torch.Tensor,
    std: torch.Tensor | float,
    advantages: torch.Tensor,
    threshold: float,
    reduce: str = "mean",
    mask: str = "asymmetric",
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPPO: ``-A r M`` with the divergence mask ``M`` (no clip, no min).

    The KL is the exact Gaussian KL between the old and new means (``reduce`` must match
    the reduction ``threshold`` was chosen for), or ``kl`` when given (another convention,
    such as :func:`official_kl`). It only decides the mask and carries no gradient.
    """
    _check_same_shape(logp_new=logp_new, logp_old=logp_old, advantages=advantages)
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    log_ratio = logp_new.float() - logp_old.float()
    adv = advantages.float()
    with torch.no_grad():
        if kl is None:
            kl = gaussian_kl(mean_new.detach(), mean_old.detach(), std, reduce)
        kl = kl.detach()
        if kl.shape != log_ratio.shape:
            raise ValueError(
                f"means give a KL of shape {tuple(kl.shape)}, log-probs have "
                f"{tuple(log_ratio.shape)}: pass one mean per log-prob"
            )
        blocked = dppo_mask(log_ratio.detach(), kl, adv, threshold, mask)
    # Blocked terms are zeroed with where, twice: once before exp so that an overflowing
    # ratio never reaches the graph (its gradient would be 0 * inf = NaN), once on the loss.
    safe_log_ratio = torch.where(blocked, torch.zeros_like(log_ratio), log_ratio)
    ratio = torch.exp(safe_log_ratio)
    loss = torch.where(blocked, torch.zeros_like(adv), -adv * ratio)
    with torch.no_grad():
        stats = _ratio_stats(log_ratio)
        stats["kl_mean"] = kl.mean()
        stats["kl_max"] = kl.max()
        stats["kl_mask_fraction"] = (kl > threshold).float().mean()
        stats["masked_fraction"] = blocked.float().mean()
        stats["grad_blocked_fraction"] = _grad_blocked_fraction(blocked, adv, ratio.detach())
    return loss, stats


def reference_kl_penalty(
    mean_new: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor | float,
    beta: float,
    reduce: str = "mean",
) -> torch.Tensor:
    """``beta * KL(pi_theta || pi_ref)`` per sample: the exact Gaussian KL to the frozen
    pre-trained model's mean at the same state (gradient flows through ``mean_new``)."""
    return beta * gaussian_kl(mean_new, mean_ref.detach(), std, reduce)


def nft_reward_weight(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality weight in [0, 1]: ``clip(A, -c, c) / (2c) + 1/2``."""
    if not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
    a = advantages.float().clamp(-adv_clip, adv_clip)
    return (a / adv_clip / 2.0 + 0.5).clamp(0.0, 1.0)


def _adaptive_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor, floor: float) -> torch.Tensor:
    """Per-sample ``mean((x0_pred - x0)^2) / w`` with the detached ``w = mean|x0_pred - x0|``
    (at least ``floor``): DiffusionNFT's adaptive weighting of the x0 error."""
    dims = tuple(range(1, x0.dim()))
    with torch.no_grad():
        w = (x0_pred.detach().double() - x0.double()).abs().mean(dim=dims, keepdim=True)
        w = w.clamp(min=floor).to(x0_pred.dtype)
    return ((x0_pred - x0) ** 2 / w).mean(dim=dims)


def nft_loss(
    v_new: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor,
    beta: float,
    adaptive_floor: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT (Zheng et al., arXiv 2509.16117): per sample
    ``(r * L+ + (1 - r) * L-) / beta`` on a noised clean sample ``x_t = (1 - sigma) x0 +
    sigma eps``, with the implicit positive and negative policies
    ``v+ = beta v + (1 - beta) v_old`` and ``v- = (1 + beta) v_old - beta v`` and
    ``L+-`` the adaptively weighted x0 errors of ``x_t - sigma v+-``. ``weight`` (``r``) is
    the optimality weight in [0, 1]; ``v_old`` carries no gradient.
    """
    _check_same_shape(v_new=v_new, v_old=v_old, x_t=x_t, x0=x0)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    v_new, v_old = v_new.float(), v_old.detach().float()
    x_t, x0 = x_t.float(), x0.float()
    s = sigma.float().reshape(-1, *([1] * (x0.dim() - 1)))
    r = weight.float().reshape(-1)
    v_pos = beta * v_new + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_new
    positive = _adaptive_x0_error(x_t - s * v_pos, x0, adaptive_floor)
    negative = _adaptive_x0_error(x_t - s * v_neg, x0, adaptive_floor)
    loss = (r * positive + (1.0 - r) * negative) / beta
    with torch.no_grad():
        dims = tuple(range(1, x0.dim()))
        stats = {
            "nft/positive_loss": positive.mean(),
            "nft/negative_loss": negative.mean(),
            "nft/weight_mean": r.mean(),
            "nft/old_deviation": ((v_new - v_old) ** 2).mean(dim=dims).mean(),
            # Exactly zero gradient only where the weight is 1/2 at the old velocity.
            "grad_blocked_fraction": ((r == 0.5) & (v_new == v_old).flatten(1).all(1))
            .float()
            .mean(),
        }
    return loss, stats


KL_CONVENTIONS = ("exact", "official")


def official_kl(
    mean_new: torch.Tensor,
    mean_old: torch.Tensor,
    std_official: torch.Tensor | float,
    reduce: str = "mean",
) -> torch.Tensor:
    """The per-step KL as the official Flow-DPPO code computes it: the old mean stored in
    bfloat16 and the noise std of :func:`flowdppo.kernels.official_flow_std`."""
    stored = mean_old.detach().to(torch.bfloat16).float()
    return gaussian_kl(mean_new, stored, std_official, reduce)
