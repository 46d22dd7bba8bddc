"""A memory budget check of the configured batch, before any work.

The rollout keeps, for each of the ``sampler.num_sde_steps`` exploration steps, the
state, the sampled next state and the mean of every sample (``3 K`` latents), plus a few
working latents (noise, current state, velocity, next state); under several processes
each one also draws the noise of the whole global batch at every SDE step. An evaluation
samples ``log.eval_samples_per_prompt`` for each evaluation prompt in one batch. If the
latents alone exceed the memory of the device they live on, the run cannot work, and a
config such as ``train.group_size=1000000000`` would otherwise create the run directory
and die of a MemoryError. The model's activations are not counted (they depend on the
model), so a batch that passes can still run out of memory in a forward pass: this check
refuses what cannot fit at all, not what is merely tight.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flowdppo.config import Config
from flowdppo.trainer.guards import TrainingError

#: Working latents a sampling step holds besides the recorded ones.
WORKING = 4


def check_batch_memory(cfg: Config, model, processes: int, eval_split) -> None:
    """Raise :class:`TrainingError` when the batch's latents cannot fit in memory."""
    probe = model.initial_noise(1, torch.Generator().manual_seed(0))
    per_sample = probe.numel() * 4  # latents are float32 in the trainer
    t, s = cfg.train, cfg.sampler
    total = cfg.samples_per_iteration
    local = -(-total // processes)
    rollout = per_sample * (
        local * (3 * s.num_sde_steps + WORKING) + (total if processes > 1 else 0)
    )
    evaluation = per_sample * WORKING * cfg.log.eval_samples_per_prompt * max(map(len, eval_split))
    limit, where = memory_limit(probe.device)
    if rollout > limit:
        raise TrainingError(
            f"train.prompts_per_iteration x train.group_size = {t.prompts_per_iteration} x "
            f"{t.group_size} = {total} samples per iteration need about {_size(rollout)} for "
            f"the rollout's latents alone ({probe[0].numel()} floats a sample, "
            f"{3 * s.num_sde_steps + WORKING} copies), more than the {_size(limit)} of {where}: "
            "lower train.group_size or train.prompts_per_iteration"
        )
    if evaluation > limit:
        raise TrainingError(
            f"log.eval_samples_per_prompt = {cfg.log.eval_samples_per_prompt} needs about "
            f"{_size(evaluation)} for an evaluation batch's latents, more than the "
            f"{_size(limit)} of {where}: lower log.eval_samples_per_prompt"
        )


def check_sample_memory(model, samples: int, option: str) -> None:
    """Raise ValueError (``option`` names the setting) when ``samples`` samples drawn in one
    batch (``flowdppo sample``: their latents while sampling, then the decoded grid) cannot
    fit in memory, before any forward pass; the forwards themselves go in batches of
    ``model.forward_batch_size``."""
    probe = model.initial_noise(1, torch.Generator().manual_seed(0))
    need = samples * probe.numel() * 4 * (WORKING + 1)
    limit, where = memory_limit(probe.device)
    if need > limit:
        raise ValueError(
            f"{option} asks for {samples} samples, which need about {_size(need)} for their "
            f"latents alone ({probe[0].numel()} floats a sample, {WORKING + 1} copies), more "
            f"than the {_size(limit)} of {where}: ask for fewer"
        )


def memory_limit(device: torch.device) -> tuple[int, str]:
    """Bytes a process may use on ``device``, and a phrase naming that memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1], f"GPU memory on {device}"
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup < limit:
        return cgroup, "this container's memory limit"
    return limit, "this machine's memory"


def _cgroup_limit() -> int | None:
    # A container (Kubernetes, Docker, SLURM with cgroups) is killed at its own limit,
    # well below the machine's memory.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def _size(n: float) -> str:
    units = ["B", "KB", "MB", "GB", "TB"]
    while n >= 1000 and len(units) > 1:
        n /= 1000
        units.pop(0)
    return f"{n:.3g} {units[0]}"
