"""Kill a real training process with SIGKILL at chosen points, resume it, and compare.

Each run is ``python -m flowdppo train`` in a subprocess on the digits task (tiny budget,
one thread, full fine-tuning, an EMA of the weights). ``FLOWDPPO_FAULT=POINT:N`` (see
``flowdppo.trainer.faults``) makes the process kill itself at the N-th pass of a named
point, so every kill lands at the same place on every machine. One run is killed five
times in a row (mid-rollout, mid-update, with a checkpoint half written, while old
checkpoints are being pruned, and between the rename of a new checkpoint and the move of
``latest``), resumed after each kill, and must end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowdppo.trainer import checkpoint as ckpt

CONFIG = [
    "model.finetune=full",
    "train.iterations=5",
    "train.prompts_per_iteration=2",
    "train.group_size=4",
    "train.minibatch_size=4",
    "train.lr_schedule=cosine",
    "train.ema.decay=0.9",
    "sampler.num_steps=6",
    "sampler.num_sde_steps=2",
    "log.eval_samples_per_prompt=2",
    "log.eval_every=2",
    "log.checkpoint_every=1",
    "log.keep_checkpoints=2",
    "log.tensorboard=false",
]


def _start(args: list[str], fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("FLOWDPPO_FAULT", None)
    if fault:
        env["FLOWDPPO_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "flowdppo", "train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _flowdppo(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    proc = _start(args, fault)
    _, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def _killed(args: list[str], fault: str) -> None:
    proc = _flowdppo(args, fault)
    assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])


def _checkpoints(run: Path) -> dict[str, str]:
    """Every ckpt-* on disk, each verified (checksums included): name -> model sha256."""
    return {
        p.name: ckpt.verify_checkpoint(p)["sha256"]["model.safetensors"]
        for p in ckpt.list_checkpoints(run)
    }


def _latest(run: Path) -> str:
    return (run / ckpt.LATEST).read_text().strip()


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_sigkill_at_five_points_then_resume_is_bit_exact(tmp_path):
    ref, run = tmp_path / "reference", tmp_path / "killed"
    reference = _start(CONFIG + [f"log.run_dir={ref}"])  # alongside the killed run
    try:
        # Iteration 2's rollout (forward passes 7-12; 6 per iteration): only ckpt-1 exists.
        _killed(CONFIG + [f"log.run_dir={run}"], "rollout:9")
        assert list(_checkpoints(run)) == ["ckpt-000001"] and _latest(run) == "ckpt-000001"
        resume = ["--resume", str(run)]

        # Iteration 3's update, after its first optimizer step (update passes 5-8 of this
        # process are iteration 3; 2 SDE steps x 2 minibatches).
        _killed(resume, "update:7")
        assert list(_checkpoints(run)) == ["ckpt-000001", "ckpt-000002"]
        assert _latest(run) == "ckpt-000002"

        # Iteration 4's checkpoint: tensor files written, state.json not yet.
        _killed(resume, "checkpoint:tensors:2")
        assert (run / ".ckpt-000004.tmp" / "model.safetensors").is_file()
        assert not (run / ".ckpt-000004.tmp" / "state.json").exists()
        assert list(_checkpoints(run)) == ["ckpt-000002", "ckpt-000003"]
        assert _latest(run) == "ckpt-000003"
        assert _metrics(run)[-1]["iteration"] == 4  # logged before its checkpoint: stale now

        # Iteration 4's checkpoint is in place and `latest` moved; ckpt-2 is about to be pruned.
        _killed(resume, "checkpoint:pruning:1")
        assert not (run / ".ckpt-000004.tmp").exists()  # the half-written one was cleared
        assert list(_checkpoints(run)) == ["ckpt-000002", "ckpt-000003", "ckpt-000004"]
        assert _latest(run) == "ckpt-000004"

        # Iteration 5's checkpoint renamed into place, `latest` not yet moved to it.
        _killed(resume, "checkpoint:renamed:1")
        assert "ckpt-000005" in _checkpoints(run) and _latest(run) == "ckpt-000004"

        finished = _flowdppo(resume)
        assert finished.returncode == 0, finished.stderr[-2000:]
        _, err = reference.communicate(timeout=300)
        assert reference.returncode == 0, err[-2000:]
    finally:
        if reference.poll() is None:  # a failed assertion above: do not leave it running
            reference.kill()
            reference.wait()

    assert _metrics(run) == _metrics(ref)
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3, 4, 5]
    final, expected = _checkpoints(run), _checkpoints(ref)
    assert list(final) == list(expected) == ["ckpt-000004", "ckpt-000005"]
    assert final == expected  # bit-identical trainable parameters
    for name in final:  # and optimizer state and RNG states
        a = ckpt.verify_checkpoint(run / name)
        b = ckpt.verify_checkpoint(ref / name)
        assert a["sha256"] == b["sha256"] and a["optimizer"] == b["optimizer"]
        assert "ema.safetensors" in a["sha256"]  # the EMA too
    summaries = [json.loads((r / "summary.json").read_text()) for r in (run, ref)]
    for key in ("before", "after", "counts", "iterations"):
        assert summaries[0][key] == summaries[1][key]
    assert not list(run.glob(".ckpt-*"))  # no temporary or half-removed directory left


def test_fault_spec_parsing():
    from flowdppo.trainer.faults import Fault, _parse

    assert _parse(None) is None and _parse("") is None
    assert _parse("update:3") == [Fault("update", 3)]
    assert _parse("checkpoint:tensors:2") == [Fault("checkpoint:tensors", 2)]
    assert _parse("checkpoint:tensors:2:SIGTERM,update:5:hang") == [
        Fault("checkpoint:tensors", 2, "SIGTERM"),
        Fault("update", 5, "hang"),
    ]
    for bad in ("update", "update:0", ":3", "update:x", "update:3:SIGNOPE", "update:SIGTERM"):
        with pytest.raises(ValueError, match="POINT:N|not a signal name"):
            _parse(bad)
