"""Preemption and the run-directory lock, on a real ``python -m flowdppo train`` subprocess.

``FLOWDPPO_FAULT=POINT:N:SIGTERM`` (``flowdppo.trainer.faults``) makes the process send
itself SIGTERM at the N-th pass of a named point, so the signal lands at the same place in
the rollout, the update or a checkpoint write on every machine. ``POINT:N:hang`` makes it
stall there, standing for a step that takes long.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from test_faults import CONFIG, _checkpoints, _flowdppo, _latest, _metrics, _start

from flowdppo.trainer import checkpoint as ckpt
from flowdppo.trainer.preemption import EXIT_PREEMPTED, REPEAT_WINDOW_S

# 6 iterations, a regular checkpoint every 2, so that a preemption checkpoint falls off
# that grid and one signal arrives during a regular checkpoint's write.
PREEMPT = [c for c in CONFIG if not c.startswith(("train.iterations", "log.checkpoint_every"))]
PREEMPT += ["train.iterations=6", "log.checkpoint_every=2"]


def _stopped(args: list[str], fault: str, iteration: int) -> str:
    proc = _flowdppo(args, fault)
    assert proc.returncode == EXIT_PREEMPTED, (fault, proc.returncode, proc.stderr[-2000:])
    assert f"stopped by SIGTERM after iteration {iteration} of 6" in proc.stderr
    assert "--resume" in proc.stderr
    return proc.stderr


def test_sigterm_in_rollout_update_and_checkpoint_write_then_resume_is_bit_exact(tmp_path):
    ref, run = tmp_path / "reference", tmp_path / "stopped"
    reference = _start(PREEMPT + [f"log.run_dir={ref}"])
    try:
        # Iteration 1's rollout (forward passes 1-6): the run stops after iteration 1 with a
        # checkpoint there, off the every-2 grid.
        _stopped(PREEMPT + [f"log.run_dir={run}"], "rollout:3:SIGTERM", 1)
        assert list(_checkpoints(run)) == ["ckpt-000001"] and _latest(run) == "ckpt-000001"
        assert [r["iteration"] for r in _metrics(run)] == [1]
        resume = ["--resume", str(run)]

        # Iteration 3's update, between its two optimizer steps (update passes 5-8 of this
        # process are iteration 3): the step is finished, then checkpointed.
        _stopped(resume, "update:7:SIGTERM", 3)
        assert list(_checkpoints(run)) == ["ckpt-000002", "ckpt-000003"]
        assert _latest(run) == "ckpt-000003"

        # During iteration 4's regular checkpoint write (tensors written, state.json not):
        # the write completes, and the next safe point is iteration 5's end.
        _stopped(resume, "checkpoint:tensors:1:SIGTERM", 5)
        assert list(_checkpoints(run)) == ["ckpt-000004", "ckpt-000005"]
        assert _latest(run) == "ckpt-000005"

        finished = _flowdppo(resume)
        assert finished.returncode == 0, finished.stderr[-2000:]
        _, err = reference.communicate(timeout=300)
        assert reference.returncode == 0, err[-2000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert _metrics(run) == _metrics(ref)
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3, 4, 5, 6]
    a, b = (ckpt.verify_checkpoint(r / "ckpt-000006") for r in (run, ref))
    assert a["sha256"] == b["sha256"] and a["optimizer"] == b["optimizer"]


def _wait_for(proc, text: str, timeout: float = 120) -> str:
    """Read the process's stderr until a line holding ``text``; all lines read so far."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never came; stderr: {''.join(seen)[-2000:]}")


def test_a_second_signal_stops_at_once_and_the_last_checkpoint_verifies(tmp_path):
    run = tmp_path / "run"
    # SIGTERM in iteration 2's update (passes 5-8), then that update stalls: only a second
    # signal can end the process now.
    proc = _start(
        CONFIG + [f"log.run_dir={run}", "log.checkpoint_every=1"],
        "update:6:SIGTERM,update:7:hang",
    )
    try:
        _wait_for(proc, "got SIGTERM")
        time.sleep(REPEAT_WINDOW_S + 0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert took < 2.0
    assert "second signal (SIGTERM): stopping now" in err and "ckpt-000001" in err
    assert list(_checkpoints(run)) == ["ckpt-000001"]  # every one left verifies
    assert _latest(run) == "ckpt-000001"


def test_a_repeated_signal_within_the_window_is_one_request(tmp_path):
    # What torchrun does: the worker gets the scheduler's signal and, milliseconds later,
    # the launcher's copy of it. The run must still stop with a checkpoint. SIGUSR1 (what
    # SLURM's --signal sends) and SIGINT (Ctrl-C) are caught like SIGTERM.
    run = tmp_path / "run"
    proc = _flowdppo(PREEMPT + [f"log.run_dir={run}"], "rollout:3:SIGUSR1,rollout:4:SIGINT")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    assert "stopped by SIGUSR1 after iteration 1 of 6" in proc.stderr
    assert "stopping now" not in proc.stderr
    assert list(_checkpoints(run)) == ["ckpt-000001"]


def test_two_resumes_at_once_one_proceeds_and_the_log_stays_in_order(tmp_path):
    run = tmp_path / "run"
    _stopped(PREEMPT + [f"log.run_dir={run}"], "rollout:3:SIGTERM", 1)
    resume = ["--resume", str(run)]
    # Both hang in their first update, so the one that got the lock still holds it while
    # the other tries.
    first, second = (_start(resume, "update:1:hang") for _ in range(2))
    procs = {first.pid: first, second.pid: second}
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = [p for p in procs.values() if p.poll() is not None]
        assert len(refused) == 1, "neither process was refused"
        loser = refused[0]
        (winner,) = [p for p in procs.values() if p is not loser]
        err = loser.stderr.read()
        assert loser.returncode == 2 and err.startswith("error: run directory")
        assert f"is in use by PID {winner.pid} on host" in err
        assert winner.poll() is None  # still running, untouched
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    # The holder died without releasing: the kernel dropped its lock, the next run takes
    # over and says from whom.
    done = _flowdppo(resume)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"took over the lock of {run} from PID {winner.pid}" in done.stderr
    iterations = [r["iteration"] for r in _metrics(run)]
    assert iterations == [1, 2, 3, 4, 5, 6]


def test_checkpoints_by_the_clock_as_well_as_by_the_iteration(tmp_path, toy_overrides):
    from flowdppo.config import load_config
    from flowdppo.trainer.loop import Trainer

    def checkpoints(minutes: str, name: str) -> list[str]:
        overrides = toy_overrides + [
            "train.iterations=3",
            "log.checkpoint_every=100",
            "log.keep_checkpoints=5",
            f"train.checkpoint_every_minutes={minutes}",
        ]
        Trainer(load_config(None, overrides), tmp_path / name).train()
        return [p.name for p in ckpt.list_checkpoints(tmp_path / name)]

    # Due at every iteration end (a microsecond has always passed), or never before the end.
    assert checkpoints("1e-8", "often") == ["ckpt-000001", "ckpt-000002", "ckpt-000003"]
    assert checkpoints("60", "rarely") == ["ckpt-000003"]


# What a stopped process does between leaving the trainer and its exit, stood for by
# sleeps: the rest of the command, then the interpreter's teardown of its modules (torch's
# take most of a second; a module global's __del__ runs then). A repeat of the signal lands
# in one of them; the process must still exit 75 as the trainer asked.
SHUTDOWN = """
import os, signal, sys, time
from flowdppo.trainer import preemption
preemption.REPEAT_WINDOW_S = {window}
with preemption.StopSignals(lambda: "checkpoint ckpt-000001 is intact") as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    while stop.signum is None:
        time.sleep(0.01)

class Teardown:
    def __del__(self, kill=os.kill, pid=os.getpid(), sleep=time.sleep):
        if {in_teardown}:
            kill(pid, signal.{second})
        sleep(0.3)

teardown = Teardown()
time.sleep({delay})
if not {in_teardown}:
    os.kill(os.getpid(), signal.{second})
time.sleep(0.3)
sys.exit(preemption.EXIT_PREEMPTED)
"""


def _shut_down(window: float, delay: float, second: str, in_teardown: bool = False):
    script = SHUTDOWN.format(window=window, delay=delay, second=second, in_teardown=in_teardown)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


@pytest.mark.parametrize(
    "delay,second,in_teardown",
    [(0.05, "SIGTERM", False), (0.2, "SIGINT", False), (0.05, "SIGTERM", True)],
)
def test_a_repeat_during_shutdown_is_still_the_same_request(delay, second, in_teardown):
    proc = _shut_down(2.0, delay, second, in_teardown)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    assert "stopping now" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_second_signal_after_the_window_during_shutdown_stops_at_once():
    proc = _shut_down(0.2, 0.3, "SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "second signal (SIGTERM): stopping now; checkpoint ckpt-000001 is intact" in (
        proc.stderr
    )
