"""Evaluation: reward and KL to the reference model on trained and held-out prompts.

The same noise is used at every evaluation (a fixed seed), so curves over training compare
like with like. Reward is measured on deterministic ODE samples; the KL to the reference is
measured along trajectories of the training sampler, where the per-step policy is Gaussian
(docs/method.md: averaged over SDE steps, and summed along the path).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from flowdppo import schedule
from flowdppo.models.base import FlowModel
from flowdppo.rewards import Reward
from flowdppo.trainer.guards import call_rewards
from flowdppo.trainer.media import GridPage, write_grid
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, reference_kl, rollout, sample


class Evaluator:
    def __init__(
        self,
        model: FlowModel,
        rewards: dict[str, Reward],
        spec: SamplerSpec,
        num_sde_steps: int,
        sde_window: tuple[float, float],
        samples_per_prompt: int,
        seed: int,
        counter: ForwardCounter | None = None,
        concurrent: bool = True,
        group_of: Callable[[str], str] | None = None,
    ):
        self.model = model
        # Prompt -> group name (a task's breakdown, e.g. the text task's word lengths):
        # each group's mean reward is logged as eval/<split>/group/<name>/reward.
        self.group_of = group_of
        self.rewards = rewards
        self.spec = spec
        self.num_sde_steps = num_sde_steps
        self.sde_window = sde_window
        self.n = samples_per_prompt
        self.seed = seed
        self.counter = counter or ForwardCounter()
        self.concurrent = concurrent
        self.grid_pages: list[GridPage] = []  # the files of the last run's grid

    @torch.no_grad()
    def split(
        self, prompts: list[str], tag: str
    ) -> tuple[dict[str, float], torch.Tensor, list[str], torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        batch = [p for p in prompts for _ in range(self.n)]
        cond = self.model.encode(batch)
        noise = self.model.initial_noise(len(batch), gen)
        final, _ = sample(self.model, cond, noise, self.spec, [], gen, self.counter, "eval")
        images = self.model.decode(final)
        out = {}
        total = 0
        scored = call_rewards(self.rewards, images, batch, concurrent=self.concurrent)
        for name, r in scored.items():
            # Like training, leave NaN / inf rewards out of the means (and count them).
            out[f"eval/{tag}/reward/{name}"] = float(r[torch.isfinite(r)].mean())
            total = total + r
        total = torch.as_tensor(total)
        finite = torch.isfinite(total)
        out[f"eval/{tag}/reward/mean"] = float(total[finite].mean())
        if not finite.all():
            out[f"eval/{tag}/reward/excluded"] = int((~finite).sum())
        out.update(_components(self.rewards, images, batch, f"eval/{tag}/reward"))
        if self.group_of is not None:
            names = [self.group_of(p) for p in batch]
            for g in sorted(set(names)):
                rows = torch.tensor([n == g for n in names]) & finite
                if rows.any():
                    out[f"eval/{tag}/group/{g}/reward"] = float(total[rows].mean())
        # KL to the reference along the training sampler's trajectories.
        steps = schedule.choose_sde_steps(
            self.spec.num_steps, self.num_sde_steps, self.sde_window, gen
        )
        group = torch.arange(len(prompts)).repeat_interleave(self.n)
        # The KL needs the states at the SDE steps only: the steps after the last one are
        # not run (they draw no noise, so the KL is the same).
        ro = rollout(
            self.model,
            batch,
            group,
            self.spec,
            steps,
            gen,
            self.counter,
            cond,
            "eval",
            until_last_sde=True,
        )
        kl = reference_kl(self.model, ro, self.spec, self.counter, phase="eval")
        out[f"eval/{tag}/kl_ref/mean"] = float(kl.mean())
        out[f"eval/{tag}/kl_ref/path"] = float(kl.sum(0).mean())
        # Only the grid's samples are kept, on the CPU: decoded videos of a real model are
        # large, and the grid shows at most 8 per prompt.
        keep = [i for i in range(len(batch)) if i % self.n < min(self.n, 8)]
        kept_images, kept_prompts = images[keep].cpu(), [batch[i] for i in keep]
        self.notes += _notes(self.rewards, kept_images, kept_prompts)
        return out, kept_images, kept_prompts, total.cpu()[keep]

    def run(
        self,
        train_prompts: list[str],
        heldout_prompts: list[str],
        grid_path: Path | None = None,
        grid_rewards: bool = True,
    ) -> dict[str, float]:
        """The metrics; with ``grid_path``, the grid's files are in ``self.grid_pages``."""
        self.notes: list[str] = []
        metrics, images, captions, rewards = self.split(train_prompts, "train")
        heldout_from = None
        if heldout_prompts:
            heldout_from = len(captions)
            held, held_images, held_captions, held_rewards = self.split(heldout_prompts, "heldout")
            metrics.update(held)
            images = torch.cat([images, held_images])
            captions = captions + held_captions
            rewards = torch.cat([rewards, held_rewards])
        self.grid_pages = []
        if grid_path is not None:
            # The first samples of every prompt (up to 8), one prompt per row, with each
            # sample's reward (the sum over rewards) under it, held-out rows marked; videos
            # also as GIF and MP4.
            self.grid_pages = write_grid(
                images,
                captions,
                grid_path,
                columns=min(self.n, 8),
                rewards=rewards if grid_rewards else None,
                notes=self.notes if any(self.notes) else None,
                heldout_from=heldout_from,
            )
        return metrics


def _components(
    rewards: dict[str, Reward], images: torch.Tensor, prompts: list[str], prefix: str
) -> dict[str, float]:
    """What a reward with a ``components(images, prompts) -> {kind: Tensor[B]}`` method (as
    ``motion`` has: its pass rate per attribute) reports beside its value: the mean of each
    kind over the samples it applies to (NaN where it does not), as ``prefix/NAME/KIND``."""
    out = {}
    for name, fn in rewards.items():
        if not callable(getattr(fn, "components", None)):
            continue
        for kind, values in fn.components(images, prompts).items():
            values = values.float()
            if torch.isfinite(values).any():
                out[f"{prefix}/{name}/{kind}"] = float(values.nanmean())
    return out


def _notes(rewards: dict[str, Reward], images: torch.Tensor, prompts: list[str]) -> list[str]:
    """What the rewards say about each grid sample (a reward with an ``annotate(images,
    prompts) -> list[str]`` method, as ``ocr`` has: the text it read), joined per sample."""
    parts = [
        fn.annotate(images, prompts)
        for fn in rewards.values()
        if callable(getattr(fn, "annotate", None))
    ]
    return [" ".join(p for p in row if p) for row in zip(*parts)] if parts else [""] * len(prompts)
