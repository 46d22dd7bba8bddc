"""What a model costs to run and what it gives at each inference budget
(``flowdppo eval RUN --steps 4,10,20,40``).

For the base model and the trained one (with LoRA: adapters applied on the fly, and merged
into the weights), at each sampling step count: the mean reward of deterministic ODE
samples on the trained and on the held-out evaluation prompts apart (fixed noise, as in
evaluation; the solver is the run's ``sampler.solver`` or ``--solver``), and the
wall-clock milliseconds per image of sampling and decoding on this machine, after one
untimed warm-up batch. NFE counts velocity evaluations per image: one per step, two with
classifier-free guidance. Rows go to ``RUN/inference_cost.json`` as ``{"rows": [{"model",
"steps", "nfe", "reward_trained", "reward_heldout", "reward_mean", "ms_per_image", "lora",
"solver"}]}``; ``reward_heldout`` is null without held-out prompts and ``reward_mean`` is
the mean over both (what files written before the split hold alone).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from flowdppo.config import Config
from flowdppo.evaluate import Evaluator
from flowdppo.models.base import FlowModel
from flowdppo.models.finetune import lora_folded
from flowdppo.trainer.guards import call_rewards
from flowdppo.trainer.loop import make_sampler_spec
from flowdppo.trainer.rollout import ForwardCounter, sample


@contextmanager
def _variant(model: FlowModel, name: str, lora: str | None) -> Iterator[None]:
    if name == "base":
        with model.reference():
            yield
    elif lora == "merged":
        with lora_folded(model.module):
            yield
    else:
        yield


def _variants(model: FlowModel) -> list[tuple[str, str | None]]:
    if callable(getattr(model.module, "merge_adapter", None)):  # a peft LoRA model
        return [("base", None), ("trained", "unmerged"), ("trained", "merged")]
    return [("base", None), ("trained", None)]


@torch.no_grad()
def _run(
    model: FlowModel, ev: Evaluator, cfg: Config, prompts: list[str], steps: int
) -> tuple[torch.Tensor, float]:
    """(each sample's reward, seconds) of ODE samples with ``steps`` steps, n per prompt in
    the order of ``prompts``; none for no prompt."""
    if not prompts:
        return torch.empty(0), 0.0
    sampler = cfg.sampler.model_copy(update={"num_steps": steps})
    # The variant decides whether the adapters are folded, not the run's sampler.merge_lora.
    sampler = sampler.model_copy(update={"merge_lora": False})
    spec = make_sampler_spec(
        cfg.model_copy(update={"sampler": sampler}),
        model.shift,
        getattr(model, "num_train_timesteps", None),
        model,
    )
    batch = [p for p in prompts for _ in range(ev.n)]
    gen = torch.Generator().manual_seed(ev.seed)
    start = time.perf_counter()
    noise = model.initial_noise(len(batch), gen)
    final, _ = sample(model, model.encode(batch), noise, spec, [], gen, ForwardCounter())
    images = model.decode(final)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    seconds = time.perf_counter() - start
    scored = call_rewards(ev.rewards, images, batch, concurrent=ev.concurrent)
    return torch.as_tensor(sum(scored.values())).float().cpu(), seconds


def _mean(rewards: torch.Tensor) -> float | None:
    """The mean of the finite rewards (None for none)."""
    finite = rewards[torch.isfinite(rewards)]
    return float(finite.mean()) if len(finite) else None


def measure(
    cfg: Config,
    model: FlowModel,
    ev: Evaluator,
    split: tuple[list[str], list[str]],
    step_counts: list[int],
) -> list[dict]:
    prompts = list(split[0]) + list(split[1])
    guided = cfg.sampler.guidance_scale > 1
    rows = []
    for name, lora in _variants(model):
        with _variant(model, name, lora):
            _run(model, ev, cfg, prompts[:1], min(step_counts))  # warm-up, untimed
            for steps in step_counts:
                # Each split from the evaluation's own noise, as the trainer evaluates it:
                # at the run's step count these are its evaluation's numbers.
                (trained, t1), (heldout, t2) = (
                    _run(model, ev, cfg, list(part), steps) for part in split
                )
                rewards, seconds = torch.cat([trained, heldout]), t1 + t2
                rows.append(
                    {
                        "model": name,
                        "steps": steps,
                        "nfe": steps * (2 if guided else 1),
                        "reward_trained": _mean(trained),
                        "reward_heldout": _mean(heldout),
                        "reward_mean": _mean(rewards),
                        "ms_per_image": 1000 * seconds / (len(prompts) * ev.n),
                        "lora": lora,
                        "solver": cfg.sampler.solver,
                    }
                )
    return rows


def format_table(rows: list[dict], iteration: int) -> str:
    solver = rows[0]["solver"] if rows else "euler"

    def reward(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [
        f"inference cost (ODE samples, {solver} solver; reward on the trained and on the "
        f"held-out evaluation prompts apart; trained = checkpoint of iteration {iteration}; "
        "times measured on this machine)",
        f"  {'model':<8} {'lora':<9} {'steps':>5} {'NFE':>5} {'trained':>8} {'held-out':>8} "
        f"{'ms/image':>9}",
    ]
    for r in rows:
        lines.append(
            f"  {r['model']:<8} {r['lora'] or '-':<9} {r['steps']:>5} {r['nfe']:>5} "
            f"{reward(r['reward_trained']):>8} {reward(r['reward_heldout']):>8} "
            f"{r['ms_per_image']:>9.2f}"
        )
    return "\n".join(lines)
