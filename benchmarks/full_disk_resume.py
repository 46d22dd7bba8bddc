"""A real full disk: run the default (LoRA) digits job on a tiny tmpfs, let it fail, grow the
file system, resume, and compare with an uninterrupted run.

The test suite simulates ENOSPC by patching the write (``tests/test_bad_inputs.py``);
this script checks the same guarantee against the kernel's own "No space left on device"
(which safetensors reports as ``SafetensorError``, not ``OSError``). It mounts a tmpfs,
so it needs root (or CAP_SYS_ADMIN) and Linux.

    sudo python benchmarks/full_disk_resume.py            # 400 KiB: fails at checkpoint 3
    sudo python benchmarks/full_disk_resume.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from flowdppo.trainer import checkpoint as ckpt

RUN = [
    "train.iterations=4",
    "train.prompts_per_iteration=2",
    "train.group_size=4",
    "train.minibatch_size=4",
    "sampler.num_steps=6",
    "sampler.num_sde_steps=2",
    "log.eval_samples_per_prompt=2",
    "log.eval_every=0",
    "log.tensorboard=false",
    "log.checkpoint_every=1",
]


def train(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flowdppo", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-kib", type=int, default=400, help="tmpfs size before growing it")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mnt, ref = Path(tmp) / "small", Path(tmp) / "reference"
        mnt.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={a.size_kib}k", "tmpfs", mnt], check=True
        )
        try:
            run = mnt / "run"
            failed = train(RUN + [f"log.run_dir={run}"])
            on_disk = {
                c.name: "verifies" for c in ckpt.list_checkpoints(run) if ckpt.verify_checkpoint(c)
            }
            logged = [r["iteration"] for r in metrics(run)]
            subprocess.run(["mount", "-o", "remount,size=4m", "tmpfs", mnt], check=True)
            resumed = train(["--resume", str(run)])
            reference = train(RUN + [f"log.run_dir={ref}"])
            final = ckpt.latest_checkpoint(run)
            result = {
                "failed_exit": failed.returncode,
                "failed_error": failed.stderr.strip().splitlines()[-1],
                "checkpoints_after_failure": on_disk,
                "metrics_after_failure": logged,
                "resumed_exit": resumed.returncode,
                "reference_exit": reference.returncode,
                "metrics_equal": metrics(run) == metrics(ref),
                "final_checkpoint_equal": ckpt.verify_checkpoint(final)["sha256"]
                == ckpt.verify_checkpoint(ref / final.name)["sha256"],
            }
        finally:
            subprocess.run(["umount", mnt], check=False)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
