"""No hung ranks: a multi-process job ends when a process, its launcher or its progress is gone.

Every process of a ``torchrun`` job runs a :class:`Watchdog` thread. Each tick
(:data:`TICK_S`, or a tenth of the bound if that is shorter) it

* checks that the launcher that started it (torchrun's agent) is still its parent: a
  worker whose agent was killed ends within one tick;
* publishes a heartbeat in the job's TCP store (the one ``torch.distributed`` rendezvoused
  through): a counter, and the phase and iteration the main thread last reported
  through :func:`mark` (every model forward pass and checkpoint step does);
* reads every other process's heartbeat and ends the job when a process has published
  nothing for ``train.dist_timeout_s`` (stopped, frozen, its machine gone), or when no
  process has made progress for that long (a deadlock, a hung kernel or file system),
  naming the process that stopped first and the phase it was in;
* ends the job when the store itself stops answering: the process that serves it (rank 0
  started by hand, or torchrun's agent) is gone.

The watchdog judges by the time it saw each heartbeat change on its own clock, so clocks
of different machines need not agree. Ending the job: one ``error:`` line, SIGKILL to the
stalled process if it runs on this machine (a stopped or hung process acts on nothing
gentler, and the launcher would otherwise wait for it), and exit status
:data:`EXIT_LOST`. Checkpoints are renamed into place, so the last complete one stays
valid; the job continues from it with ``--resume``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

#: Exit status of a process that ends the job because another part of it is gone or hung
#: (sysexits' EX_UNAVAILABLE).
EXIT_LOST = 69
TICK_S = 1.0


class _Progress:
    """What the main thread last did; written by :func:`mark`, read by the watchdog."""

    phase = "start"
    iteration = 0
    beats = 0


progress = _Progress()
_ending = threading.Lock()


def mark(phase: str) -> None:
    """Record progress in ``phase`` (a few attribute writes: cheap enough per forward pass)."""
    progress.phase = phase
    progress.beats += 1


def claim_exit() -> bool:
    """True for the first caller only: the one that reports why the job ends."""
    return _ending.acquire(blocking=False)


class Watchdog:
    def __init__(
        self,
        rank: int,
        peers: list[tuple[str, int]],
        bound_s: float,
        hint: Callable[[], str],
    ) -> None:
        """``peers``: every rank's (host, PID), so that even a process stopped before its
        first heartbeat can be named and ended."""
        self.rank, self.world_size, self.bound = rank, len(peers), bound_s
        self.peers = peers
        self.tick = min(TICK_S, bound_s / 10)
        self.hint = hint
        self.host = socket.gethostname()
        # Only a launcher's worker has a parent whose death ends it; a process started by
        # hand (nohup, a shell that exits) is left alone.
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"flowdppo/heartbeat/{restart}/"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.where = f"{addr}:{port}"
        import torch.distributed as dist

        # A client of its own: the process group's store serves the main thread.
        self.store = dist.TCPStore(
            addr,
            port,
            is_master=False,
            timeout=timedelta(seconds=max(self.bound, 5.0)),
            wait_for_workers=False,
        )
        now = time.monotonic()
        self.seen: dict[int, dict] = {}
        self.heard_at = dict.fromkeys(range(self.world_size), now)
        self.moved_at = dict.fromkeys(range(self.world_size), now)
        self.seq = 0
        self._beat()  # before training goes on: every rank has a heartbeat from the start
        self._thread = threading.Thread(target=self._run, name="flowdppo-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.tick + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            if self.parent is not None and os.getppid() != self.parent:
                self._end(
                    f"rank {self.rank}: the launcher that started it (PID {self.parent}) "
                    "is gone; stopping this worker"
                )
            try:
                self._beat()
                self._read()
            except Exception as exc:  # any store failure: its server is gone
                if not self._stop.is_set():
                    self._end(
                        f"rank {self.rank} lost contact with the job's store at {self.where} "
                        f"({type(exc).__name__}): rank 0 or the launcher that serves it is gone"
                    )
                return
            self._judge()

    def _beat(self) -> None:
        self.seq += 1
        me = {
            "seq": self.seq,
            "beats": progress.beats,
            "phase": progress.phase,
            "iteration": progress.iteration,
        }
        self.store.set(self.prefix + str(self.rank), json.dumps(me))

    def _read(self) -> None:
        now = time.monotonic()
        for r in range(self.world_size):
            key = self.prefix + str(r)
            if not self.store.check([key]):
                continue  # not started yet: judged from the watchdog's own start
            hb = json.loads(self.store.get(key))
            old = self.seen.get(r)
            if old is None or hb["seq"] != old["seq"]:
                self.heard_at[r] = now
            if old is None or hb["beats"] != old["beats"]:
                self.moved_at[r] = now
            self.seen[r] = hb

    def _judge(self) -> None:
        now = time.monotonic()
        for r, at in self.heard_at.items():
            if now - at > self.bound:
                self._end(
                    f"rank {r}{self._where(r)} stopped responding: no heartbeat for "
                    f"{now - at:.0f} s (train.dist_timeout_s = {self.bound:g}); it was last "
                    f"in {self._doing(r)}",
                    culprit=r,
                )
        if all(now - at > self.bound for at in self.moved_at.values()):
            r = min(self.moved_at, key=self.moved_at.get)
            self._end(
                f"no process made progress for {self.bound:g} s (train.dist_timeout_s); "
                f"rank {r}{self._where(r)} stopped first, in {self._doing(r)}",
                culprit=r,
            )

    def _where(self, r: int) -> str:
        host, pid = self.peers[r]
        return f" (PID {pid} on {host})"

    def _doing(self, r: int) -> str:
        hb = self.seen.get(r)
        if hb is None:
            return "its start-up (it never reported)"
        return f"phase {hb['phase']!r} of iteration {hb['iteration'] + 1}"

    def _end(self, reason: str, culprit: int | None = None) -> None:
        if not claim_exit():
            return  # the main thread is already reporting, then exiting
        os.write(2, f"error: {reason}. Ending the job; {self.hint()}\n".encode())
        if culprit is not None and culprit != self.rank:
            host, pid = self.peers[culprit]
            if host == self.host:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        os._exit(EXIT_LOST)
