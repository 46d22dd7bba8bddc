"""Run under ``torchrun``: one short training run per (algorithm, sharding), in one launch.

``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_matrix.py OUT ALG:MODE
... -- OVERRIDE ...`` trains each algorithm with ``train.distributed=MODE`` into
``OUT/ALG-MODE`` (``+`` in an algorithm's name becomes ``_``); ``resume@ALG:MODE`` copies
that run as a kill after its first checkpoint leaves it and resumes the copy into
``OUT/ALG-MODE-resumed``. One launch shares the
process group and the imports of every run: launching ``torchrun`` once per run would cost
the test suite a minute more.
"""

import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from flowdppo.config import load_config
from flowdppo.runs import resume_config
from flowdppo.trainer import distributed


def thresholded_digit_prob():
    """``digit_prob > 0.5`` as 0 or 1: groups of equal rewards (advantage exactly 0) are
    common, for train.drop_zero_advantage (a reward by import path, so that the workers
    and the one-process reference load the same one)."""
    from flowdppo.rewards import get_reward

    inner = get_reward("digit_prob")
    return lambda images, prompts: (inner(images, prompts) > 0.5).float()


def own_overrides(algorithm: str, overrides: list[str]) -> list[str]:
    """The shared overrides an algorithm can use: nft's own keys for nft only, and no
    trained range of recorded steps for nft (it replays none)."""
    foreign = "train.trained_steps=" if algorithm.startswith("nft") else "nft."
    return [o for o in overrides if not o.startswith(foreign)]


def run_dir(out: Path, algorithm: str, mode: str) -> Path:
    return out / f"{algorithm.replace('+', '_')}-{mode}"


def main(argv: list[str]) -> None:
    split = argv.index("--")
    out, specs, overrides = Path(argv[0]), argv[1:split], argv[split + 1 :]
    for spec in specs:
        action, _, spec = spec.rpartition("@")
        algorithm, mode = spec.split(":")
        run = run_dir(out, algorithm, mode)
        if action == "resume":
            # The state a kill just after the first of two checkpoints leaves.
            killed = run.with_name(run.name + "-resumed")
            if dist.get_rank() == 0:
                shutil.copytree(run, killed)
                shutil.rmtree(killed / "ckpt-000002")
                (killed / "latest").write_text("ckpt-000001\n")
                (killed / "summary.json").unlink()
            dist.barrier()
            cfg = resume_config(killed, [])
            distributed.DistributedTrainer(cfg, killed, resume=True).train()
            continue
        cfg = load_config(
            None,
            [
                *own_overrides(algorithm, overrides),
                f"algorithm={algorithm}",
                f"train.distributed={mode}",
                f"log.run_dir={run}",
            ],
        )
        distributed.DistributedTrainer(cfg, run).train()
    distributed.finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
