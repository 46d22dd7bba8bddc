"""Graceful stops: a preemption signal ends the run at the next safe point with a checkpoint.

SLURM and Kubernetes send SIGTERM some time before they kill a job (SLURM can be asked to
send SIGUSR1 earlier, ``--signal``); a user sends SIGINT with Ctrl-C. On the first of these
the trainer finishes the iteration it is in, writes a checkpoint at that iteration
boundary (the only place where every RNG state is consistent, so the resumed run is the
uninterrupted one bit for bit) and exits with :data:`EXIT_PREEMPTED`. A second signal at
least :data:`REPEAT_WINDOW_S` after the first ends the process at once with
``128 + signal number``, as the shell reports a death by that signal; checkpoints are
written under a temporary name and renamed, so the last complete one still verifies.

The signals are read by a helper thread through :func:`signal.set_wakeup_fd`, not by a
Python signal handler: a handler runs only when the main thread returns to the
interpreter, which a long model forward or a collective waiting on a hung peer can delay
indefinitely, and "a second signal aborts at once" must hold then too.

A signal repeated within :data:`REPEAT_WINDOW_S` counts once: under SLURM every process of
a job step gets the signal, and ``torchrun`` forwards the one it got itself to its workers
a few milliseconds later, so each worker sees the same request twice. This holds until the
process has exited, not only while the trainer runs: the copy may arrive while the process
shuts down after its checkpoint.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

#: Exit status after a graceful stop with a checkpoint (sysexits' EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: Seconds within which a repeated signal is the same request, not a second one.
REPEAT_WINDOW_S = 2.0


class Preempted(Exception):
    """The run stopped at a safe point after a signal; the message says how to continue."""


class StopSignals:
    """While active (a context manager), records the first stop signal in :attr:`signum`.

    ``on_abort()`` returns the line printed before a second signal ends the process (it
    names the checkpoint that survives).
    """

    def __init__(self, on_abort: Callable[[], str]) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._on_abort = on_abort
        self._old: dict[int, object] = {}
        self._old_fd = -1
        self._active = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        # Signals can only be caught in the main thread (a trainer run from a worker thread,
        # as `flowdppo compare` may, keeps the process's defaults).
        if threading.current_thread() is not threading.main_thread():
            return self
        self._reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._writer = writer
        self._old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for sig in SIGNALS:
            # A Python-level handler must exist for the wakeup fd to be written; the work
            # happens in the reader thread.
            self._old[sig] = signal.signal(sig, _ignore)
        self._active = True
        self._thread = threading.Thread(target=self._read, name="flowdppo-signals", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self._active:
            return
        self._active = False
        for sig, old in self._old.items():
            # After a stop request the process is on its way out (the checkpoint, the
            # interpreter's and the process group's shutdown: a second or more). A repeat of
            # the request in that time (torchrun's forwarded copy) must not turn exit 75
            # into a death by the default action; one after the window still ends it.
            signal.signal(sig, old if self.signum is None else self._late)
        if self.signum is not None:
            atexit.register(self._ignore_repeats_at_exit)
        signal.set_wakeup_fd(self._old_fd)
        self._writer.close()  # ends the reader thread
        # Joined before its socket closes: a daemon thread still inside recv() when the
        # interpreter shuts down is torn down mid-call, which can abort the process
        # ("terminate called without an active exception") after a run that succeeded.
        self._thread.join(timeout=5)
        self._reader.close()

    def _read(self) -> None:
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in SIGNALS:
                    self._received(signum)

    def _late(self, signum: int, frame) -> None:
        """The handler once the block is left after a stop request: repeats within the
        window count as the same request, as inside the block."""
        self._received(signum)

    def _ignore_repeats_at_exit(self) -> None:
        """The interpreter's shutdown, after its atexit calls, puts the default action back
        for every signal with a Python handler, then tears down the modules (torch's take
        most of a second): a repeat then would end the process with 143 after all. Ignored
        signals stay ignored, so within the window the stop signals are ignored to the end."""
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def _received(self, signum: int) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self._first_at = now
            self.signum = signum
            _say(
                f"flowdppo: got {name}: finishing this iteration, then writing a checkpoint "
                f"and stopping (a second signal, {REPEAT_WINDOW_S:g} s or more from now, "
                "stops at once without one)"
            )
        elif now - self._first_at >= REPEAT_WINDOW_S:
            _say(f"flowdppo: second signal ({name}): stopping now; {self._on_abort()}")
            os._exit(128 + signum)


def _ignore(signum, frame) -> None:
    pass


def _say(line: str) -> None:
    # os.write, not print: this may run while the main thread is inside a print.
    os.write(2, (line + "\n").encode())
