"""Fault injection for the crash tests: kill, signal or stall this process at a named point.

``FLOWDPPO_FAULT=POINT:N`` makes the N-th time the code passes ``fault_point("POINT")``
end the process with SIGKILL: no ``finally`` blocks, no flushing, exactly what an
out-of-memory kill or a pre-empted machine does. ``POINT:N:ACTION`` picks another action:

* ``SIGTERM``, ``SIGINT``, ``SIGUSR1`` (any signal name): send that signal to this process
  and go on, as a scheduler's preemption notice would arrive in the middle of that step;
* ``hang``: stop making progress there for good (sleep), as a process stuck in a kernel, a
  deadlock or a dead file system does; its other threads keep running.

Several faults are separated by commas (``update:3:SIGTERM,update:5:hang``); each counts
its own point. Points in the trainer:

* ``rollout``, ``update``, ``ref_kl``, ``eval``: a model forward pass of that phase
  (so ``update:3`` dies in the middle of an iteration's policy update);
* ``checkpoint:tensors``: the tensor files of a checkpoint are written, its
  ``state.json`` is not;
* ``checkpoint:renamed``: the new checkpoint directory is in place, ``latest`` still
  points at the previous one;
* ``checkpoint:pruning``: ``latest`` has moved, old checkpoints are being removed.

Unset (the normal case) a point costs one comparison with ``None``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ENV = "FLOWDPPO_FAULT"


@dataclass
class Fault:
    point: str
    count: int
    action: str = "SIGKILL"
    hits: int = 0


def _parse_one(spec: str) -> Fault:
    head, sep, last = spec.rpartition(":")
    action = "SIGKILL"
    if sep and not last.isdigit() and (last == "hang" or last.startswith("SIG")):
        if last != "hang" and not isinstance(getattr(signal, last, None), signal.Signals):
            raise ValueError(f"{ENV}: {last!r} in {spec!r} is not a signal name")
        action, spec = last, head
    point, sep, count = spec.rpartition(":")
    if not sep or not point or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"{ENV}={spec!r} must be POINT:N[:ACTION] with N >= 1, e.g. update:3 or "
            "update:3:SIGTERM"
        )
    return Fault(point, int(count), action)


def _parse(spec: str | None) -> list[Fault] | None:
    if not spec:
        return None
    return [_parse_one(part) for part in spec.split(",")]


_faults = _parse(os.environ.get(ENV))


def fault_point(name: str) -> None:
    """Count a pass through ``name``; act on the configured pass."""
    if _faults is None:
        return
    for fault in _faults:
        if fault.point != name:
            continue
        fault.hits += 1
        if fault.hits != fault.count:
            continue
        if fault.action == "hang":
            while True:
                time.sleep(3600)
        os.kill(os.getpid(), getattr(signal, fault.action))
