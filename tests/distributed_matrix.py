"""Run under ``torchrun``: several short training runs in one launch.

``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_matrix.py OUT
VARIANTS.json SPEC ...``: ``VARIANTS.json`` maps a variant name to its config overrides;
each ``SPEC`` is ``VARIANT/ALGORITHM:MODE`` and trains that algorithm with
``train.distributed=MODE`` into :func:`run_dir`; ``resume@SPEC`` copies that run as a
kill after its first checkpoint leaves it and resumes the copy (``...-resumed``). One
launch shares the process group and the imports of every run: a ``torchrun`` launch per
run would cost the test suite about ten seconds each.
"""

import json
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


def run_dir(out: Path, spec: str) -> Path:
    """``VARIANT/ALGORITHM:MODE`` -> ``OUT/VARIANT-ALGORITHM-MODE`` (``+`` becomes ``_``)."""
    variant, _, rest = spec.partition("/")
    algorithm, mode = rest.split(":")
    return out / f"{variant}-{algorithm.replace('+', '_')}-{mode}"


def main(argv: list[str]) -> None:
    out, variants = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    for spec in argv[2:]:
        action, _, spec = spec.rpartition("@")
        run = run_dir(out, spec)
        if action == "resume":
            # The state a kill just after the first of two checkpoints leaves.
            killed = run.with_name(run.name + "-resumed")
            if dist.get_rank() == 0:
                shutil.copytree(run, killed)
                shutil.rmtree(killed / "ckpt-000002")
                (killed / "latest").write_text("ckpt-000001\n")
                (killed / "summary.json").unlink()
            dist.barrier()
            distributed.DistributedTrainer(resume_config(killed, []), killed, resume=True).train()
            continue
        variant, _, rest = spec.partition("/")
        algorithm, mode = rest.split(":")
        overrides = [*own_overrides(algorithm, variants[variant]), f"algorithm={algorithm}"]
        cfg = load_config(None, [*overrides, f"train.distributed={mode}", f"log.run_dir={run}"])
        distributed.DistributedTrainer(cfg, run).train()
    distributed.finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
