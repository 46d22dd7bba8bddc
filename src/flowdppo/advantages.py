"""Group-relative advantages and the combination of several rewards (docs/method.md).

A group is the samples drawn for one prompt in one iteration, identified here by an integer
group index per sample, so groups need not be contiguous or of equal size.
"""

from __future__ import annotations

import torch

STD_MODES = ("global", "group")
COMBINE = ("weighted", "gdpo")
EPS = 1e-8


def _group_moments(values: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and (population) std of the sample's group."""
    _, inverse = torch.unique(group, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    counts = torch.zeros(n_groups, dtype=values.dtype).index_add_(
        0, inverse, torch.ones_like(values)
    )
    mean = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inverse, values) / counts
    centred = values - mean[inverse]
    var = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inverse, centred**2) / counts
    return mean[inverse], var.sqrt()[inverse]


def _check(rewards: torch.Tensor, group: torch.Tensor) -> None:
    if rewards.dim() != 1 or group.shape != rewards.shape:
        raise ValueError(
            f"rewards and group index must be 1-D of equal length, got {tuple(rewards.shape)} "
            f"and {tuple(group.shape)}"
        )


def group_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    *,
    std: str = "global",
    clip: float | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """``(R - mean_group) / (std + eps)`` with the group's own std or one batch-wide std.

    A group whose rewards are all equal gets 0 (never NaN). ``clip`` bounds the result to
    ``[-clip, clip]``. ``eps`` is 1e-8 by default; Flow-GRPO and DiffusionNFT add 1e-4
    (``flow_grpo/stat_tracking.py``), the ``reward.adv_eps`` of their recipes.
    """
    _check(rewards, group)
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    r = rewards.detach().double()
    mean, group_std = _group_moments(r, group)
    scale = r.std(unbiased=False) if std == "global" else group_std
    if not eps > 0:
        raise ValueError(f"advantage eps must be > 0, got {eps}")
    adv = (r - mean) / (scale + eps)
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"advantage clip must be > 0, got {clip}")
        adv = adv.clamp(-clip, clip)
    return adv.float()


def combine_rewards(
    rewards: dict[str, torch.Tensor],
    group: torch.Tensor,
    *,
    weights: dict[str, float] | None = None,
    method: str = "weighted",
    std: str = "global",
    clip: float | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Advantages from several rewards (``eps``: the constant added to every std).

    ``weighted``: weighted sum of the raw rewards, then group normalisation.
    ``gdpo``: normalise each reward within its group, weighted sum, then normalise over
    the batch, so a reward with a large raw scale cannot drown the others.
    """
    if method not in COMBINE:
        raise ValueError(f"reward combination must be one of {COMBINE}, got {method!r}")
    if not rewards:
        raise ValueError("no rewards to combine")
    weights = weights or {}
    unknown = set(weights) - set(rewards)
    if unknown:
        raise ValueError(f"weights given for unknown rewards {sorted(unknown)}")
    w = {name: float(weights.get(name, 1.0)) for name in rewards}
    if method == "weighted":
        total = sum(w[n] * r.double() for n, r in rewards.items())
        return group_advantages(total, group, std=std, clip=clip, eps=eps)
    total = sum(
        w[n] * group_advantages(r, group, std="group", eps=eps).double() for n, r in rewards.items()
    )
    adv = (total - total.mean()) / (total.std(unbiased=False) + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.float()
