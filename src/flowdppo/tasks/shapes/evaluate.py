"""Per-skill GenEval-style scores of a shapes model under plain Euler ODE sampling."""

from __future__ import annotations

import torch

from flowdppo.models.base import FlowModel
from flowdppo.tasks.shapes.detect import PromptCheck, check_images, skill_summary


@torch.no_grad()
def euler_sample(
    model: FlowModel,
    prompts: list[str],
    steps: int = 10,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Decoded samples, one per prompt, from Euler ODE steps on ``linspace(1, 0, steps + 1)``.

    The noise is drawn for all prompts at once, so results do not depend on ``batch_size``.
    """
    generator = generator or torch.Generator().manual_seed(0)
    noise = model.initial_noise(len(prompts), generator)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cond = model.encode(chunk)
        x = noise[start : start + batch_size]
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = model.velocity(x, s.expand(len(chunk)), cond, guidance_scale)
            x = x + (s_next - s) * v
        out.append(model.decode(x))
    return torch.cat(out)


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
