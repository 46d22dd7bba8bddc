"""One writer per run directory: an OS file lock, with the holder named in the lock file.

Two trainers writing one run directory interleave ``metrics.jsonl`` and race on the
checkpoint names. :class:`RunLock` takes an exclusive ``flock`` on ``RUN_DIR/.lock`` and
writes the holder's host, PID and start time into it. The kernel releases the lock when
the holder dies, however it dies (SIGKILL, out of memory), so a lock left by a dead
process never blocks: the next trainer takes it and says whose it was. Only the lock
itself decides; the text in the file is for the message.

On Linux, ``flock`` on NFS is carried by NFS byte-range locks, so the lock also holds
between machines sharing the run directory over NFS. File systems mounted without lock
support (some Lustre and FUSE mounts) make ``flock`` fail; the trainer then says so
rather than run unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from flowdppo.trainer.guards import TrainingError

LOCK = ".lock"


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`TrainingError` naming the process that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TrainingError(f"cannot create the run lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise TrainingError(
                    f"run directory {self.path.parent} is in use by {_holder(self.path)}; "
                    "two trainers writing one run would corrupt its metrics and checkpoints. "
                    "Wait for that process to end (or stop it), then resume"
                ) from None
            raise TrainingError(
                f"cannot lock the run directory {self.path.parent} ({exc}); its file system "
                "does not support file locks: put log.run_dir on one that does"
            ) from exc
        previous = _read(fd)
        if previous:
            # The kernel released that process's lock, so it is gone (or has finished
            # without clearing the file, which a release always does).
            print(
                f"flowdppo: took over the lock of {self.path.parent} from "
                f"{_describe(previous)}, which no longer runs",
                file=sys.stderr,
                flush=True,
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except OSError:
            # A full disk: the lock holds without its note (a second trainer is still
            # refused, only without this one's name); the run's own writes say what failed.
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: released in order, nothing to report
        except OSError:
            pass
        os.close(fd)  # closing drops the flock

    def __del__(self) -> None:
        # A trainer dropped without finishing (in a test, a notebook) frees its directory.
        self.release()


def _read(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(info: dict) -> str:
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}{when}"


def _holder(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "another process"
    try:
        info = _read(fd)
    finally:
        os.close(fd)
    return _describe(info) if info else "another process (it has not named itself yet)"
