"""Fault injection for the crash tests: kill this process at a named point.

``FLOWDPPO_FAULT=POINT:N`` makes the N-th time the code passes ``fault_point("POINT")``
end the process with SIGKILL: no ``finally`` blocks, no flushing, exactly what an
out-of-memory kill or a pre-empted machine does. Points in the trainer:

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

ENV = "FLOWDPPO_FAULT"


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    point, sep, count = spec.rpartition(":")
    if not sep or not point or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV}={spec!r} must be POINT:N with N >= 1, e.g. update:3")
    return point, int(count)


_target = _parse(os.environ.get(ENV))
_hits = 0


def fault_point(name: str) -> None:
    """Count a pass through ``name``; SIGKILL this process on the configured pass."""
    global _hits
    if _target is None or _target[0] != name:
        return
    _hits += 1
    if _hits == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
