"""Policy objectives: Flow-GRPO / Flow-CPS ratio clipping and the Flow-DPPO divergence mask.

Each function returns element-wise losses (one per trained step of one sample; the caller
reduces) and a dict of detached scalar statistics. The objectives differ only here: the
trainer hands every one of them the same log-probs, means and advantages.
"""

from __future__ import annotations

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
    high = clip_range if clip_range_high is None else clip_range_high
    if not (clip_range > 0 and high > 0):
        raise ValueError(f"clip ranges must be > 0, got {clip_range} and {high}")
    log_ratio = logp_new.float() - logp_old.float()
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = _ratio_stats(log_ratio)
        below, above = ratio < 1.0 - clip_range, ratio > 1.0 + high
        # clip_fraction is the window fraction: every ratio outside it, including the terms
        # whose unclipped branch wins the max and so keep their gradient. Only a ratio past
        # the window in the advantage's own direction loses it.
        stats["clip_fraction"] = (below | above).float().mean()
        removed = ((adv > 0) & above) | ((adv < 0) & below)
        stats["grad_blocked_fraction"] = _grad_blocked_fraction(removed, adv, ratio)
    return loss, stats


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPPO: ``-A r M`` with the divergence mask ``M`` (no clip, no min).

    The KL is the exact Gaussian KL between the old and new means (``reduce`` must match
    the reduction ``threshold`` was chosen for). It only decides the mask and carries no
    gradient.
    """
    _check_same_shape(logp_new=logp_new, logp_old=logp_old, advantages=advantages)
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    log_ratio = logp_new.float() - logp_old.float()
    adv = advantages.float()
    with torch.no_grad():
        kl = gaussian_kl(mean_new.detach(), mean_old.detach(), std, reduce)
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
