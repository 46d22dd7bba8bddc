"""Base-model reward of the digits task under plain Euler ODE sampling (no trainer needed)."""

from __future__ import annotations

import torch

from flowdppo.models.base import FlowModel
from flowdppo.rewards import Reward
from flowdppo.tasks.common import euler_sample


def evaluate_base(
    model: FlowModel | None = None,
    prompts: list[str] | None = None,
    *,
    samples_per_prompt: int = 256,
    steps: int = 10,
    guidance_scale: float = 1.0,
    seed: int = 0,
    rewards: dict[str, Reward] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean reward per prompt of ``model`` (default: the shipped base model).

    Returns ``{reward name: {prompt: mean, ..., "train": mean over the train prompts,
    "heldout": mean over the held-out prompts}}`` (the split means cover only the prompts
    evaluated).
    """
    from flowdppo.rewards import get_reward
    from flowdppo.tasks.digits.data import DIGIT_NAMES, HELDOUT_PROMPTS, TRAIN_PROMPTS
    from flowdppo.tasks.digits.model import load_base_model

    model = model or load_base_model()
    prompts = list(prompts or DIGIT_NAMES)
    rewards = rewards or {n: get_reward(n) for n in ("digit_prob", "digit_smoothness")}
    batch = [p for p in prompts for _ in range(samples_per_prompt)]
    images = euler_sample(model, batch, steps, guidance_scale, torch.Generator().manual_seed(seed))
    out: dict[str, dict[str, float]] = {}
    for name, fn in rewards.items():
        r = torch.as_tensor(fn(images, batch)).float().view(len(prompts), samples_per_prompt)
        per = {p: r[i].mean().item() for i, p in enumerate(prompts)}
        for split, names in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
            vals = [per[p] for p in names if p in per]
            if vals:
                per[split] = sum(vals) / len(vals)
        out[name] = per
    return out
