"""Per-skill GenEval-style scores of a shapes model under plain Euler ODE sampling."""

from __future__ import annotations

import torch

from flowdppo.models.base import FlowModel
from flowdppo.tasks.common import euler_sample
from flowdppo.tasks.shapes.detect import PromptCheck, check_images, skill_summary


def evaluate_prompts(
    model: FlowModel,
    prompts: list[str],
    *,
    samples_per_prompt: int = 16,
    steps: int = 10,
    guidance_scale: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float]], list[PromptCheck], torch.Tensor]:
    """Sample every prompt ``samples_per_prompt`` times and score it.

    Returns (:func:`~flowdppo.tasks.shapes.detect.skill_summary` of the checks, the checks,
    the images), samples grouped by prompt.
    """
    batch = [p for p in prompts for _ in range(samples_per_prompt)]
    images = euler_sample(model, batch, steps, guidance_scale, torch.Generator().manual_seed(seed))
    checks = check_images(images, batch)
    return skill_summary(checks), checks, images
