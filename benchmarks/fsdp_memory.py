"""What each process stores under DDP and FSDP: parameters, trainable parameters, optimizer state.

Runs the digits task with 2 processes (torchrun, gloo, CPU, one thread each) for each of
``train.distributed`` = ddp / fsdp and ``model.finetune`` = lora / full, takes one training
iteration (so Adam's state exists), and counts on every process the bytes of the tensors it
holds itself: for a sharded parameter (a ``DTensor``) its local shard, otherwise the whole
tensor. The reference copy of full fine-tuning is counted with the parameters. These are
the persistent tensors; what a process holds at its peak adds the gathered parameters of
the block being computed (FSDP) and the activations, which are not counted here.

    python benchmarks/fsdp_memory.py                 # writes docs/results/fsdp_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

BASE = [
    "task=digits",
    "train.threads=1",
    "log.eval_every=0",
    "log.tensorboard=false",
]


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _full_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def worker(overrides: list[str], out: Path) -> None:
    import torch.distributed as dist

    from flowdppo.config import load_config
    from flowdppo.trainer.distributed import DistributedTrainer, finish_distributed

    run_dir = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    cfg = load_config(None, BASE + overrides + [f"log.run_dir={run_dir}"])
    trainer = DistributedTrainer(cfg, run_dir)
    trainer.run_iteration()
    model = trainer.model
    modules = [model.module] + ([model.frozen_reference] if model.frozen_reference else [])
    params = [p for m in modules for p in m.parameters()]
    optim = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    row = {
        "rank": trainer.rank,
        "params_local_bytes": sum(_local_bytes(p) for p in params),
        "params_full_bytes": sum(_full_bytes(p) for p in params),
        "trainable_local_bytes": sum(_local_bytes(p) for p in trainer.params),
        "trainable_full_bytes": sum(_full_bytes(p) for p in trainer.params),
        "optimizer_local_bytes": sum(_local_bytes(v) for v in optim),
        "optimizer_full_bytes": sum(_full_bytes(v) for v in optim),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(row))
    trainer.wrapped = None
    finish_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/fsdp_memory.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    ns = parser.parse_args()
    if ns.worker:
        worker(ns.overrides, Path(ns.worker))
        return
    results = []
    for finetune in ("lora", "full"):
        for mode in ("ddp", "fsdp"):
            with tempfile.TemporaryDirectory() as tmp:
                overrides = [f"train.distributed={mode}", f"model.finetune={finetune}"]
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node=2",
                    __file__,
                    "--worker",
                    tmp,
                    *overrides,
                    *ns.overrides,
                ]
                done = subprocess.run(
                    cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True
                )
                if done.returncode:
                    sys.exit(done.stderr[-3000:])
                ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
            results.append({"distributed": mode, "finetune": finetune, "ranks": ranks})
            r0 = ranks[0]
            print(
                f"{finetune:5s} {mode:5s} per process: params {r0['params_local_bytes']:>9,d} B "
                f"of {r0['params_full_bytes']:,d}, trainable {r0['trainable_local_bytes']:>9,d} "
                f"B, Adam state {r0['optimizer_local_bytes']:>9,d} B "
                f"of {r0['optimizer_full_bytes']:,d}"
            )
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"world_size": 2, "overrides": BASE + ns.overrides, "results": results}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
