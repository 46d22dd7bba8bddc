"""How many CPU threads torch uses: the cores other processes leave idle.

A small network on a CPU runs nearly twice as fast on two threads as on one when the
second core is idle, and more than twice as slow when it is not: OpenMP's threads
spin-wait for each other, and a busy core makes every parallel region wait for the
slowest. Measured with the text task on a 2-core machine (docs/cost.md, "The built-in
tasks' default runs"): two threads took 0.57x one thread's wall time alone, and two runs
started together with two threads each took 1.9x as long as with one thread each.

``train.threads: auto``, or ``null`` with a task that asks for ``"auto"`` (shapes, text),
hands the run to a :class:`ThreadGovernor`: before the first evaluation and after every iteration it
reads how much of the machine's CPU time went to other processes over the last stretch
(``/proc/stat`` against this process's own CPU time) and sets torch's thread count to
the cores this process used plus those left idle, at least 1 and at most the cores it may
run on (its CPU affinity and cgroup quota). A second run started beside it takes the
busy core into account on both sides: both settle on one thread. Changing the count does
not change what is computed: the same run gives the same numbers with one thread or two
(docs/cost.md). ``OMP_NUM_THREADS`` set in the environment, or ``train.threads: N``,
fixes the count instead (``flowdppo compare`` runs each job on one thread that way).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

#: The first reading of the machine's load: how long it watches before the run starts.
FIRST_LOOK_S = 0.2


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 quota
    (``cpu_max``: "QUOTA PERIOD" in microseconds, or "max PERIOD")."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of ``cpus`` since boot, from /proc/stat; None elsewhere."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


class ThreadGovernor:
    """Sets torch's thread count to the cores this process can use now (see the module)."""

    def __init__(self, cap: int | None = None):
        self.before = torch.get_num_threads()
        self.limit = usable_cpus() if cap is None else max(1, min(cap, usable_cpus()))
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except AttributeError:
            self.cpus = set(range(os.cpu_count() or 1))
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.threads = self.limit
        self._mark = self._reading()
        if self._mark is not None:
            time.sleep(FIRST_LOOK_S)
        self.adjust()

    def _reading(self) -> tuple[int, int, float, float] | None:
        ticks = _cpu_ticks(self.cpus)
        if ticks is None:
            return None
        return (*ticks, time.process_time(), time.monotonic())

    def adjust(self) -> int:
        """Set and return the thread count for the next stretch of work."""
        now = self._reading()
        if now is not None and self._mark is not None:
            busy, total, own, wall = (a - b for a, b in zip(now, self._mark))
            if total > 0 and wall > 0:
                cores = len(self.cpus)
                idle = cores * (1 - busy / total)  # cores no process used
                used = own / wall  # cores this process used
                self.threads = max(1, min(self.limit, int(used + idle + 0.5)))
        self._mark = now
        torch.set_num_threads(self.threads)
        return self.threads

    def close(self) -> None:
        """Give torch back the thread count it had before."""
        torch.set_num_threads(self.before)


def governor_for(configured: int | str | None, recommended) -> ThreadGovernor | None:
    """The governor a run gets: ``train.threads: N`` or ``OMP_NUM_THREADS`` fix the count
    (None returned; a configured count is set here), as does a task's integer
    recommendation; ``train.threads: auto``, or a task recommending ``"auto"`` with
    ``train.threads`` null, gets a governor. A task without one leaves torch's own count
    alone."""
    if configured == "auto":
        return ThreadGovernor()
    if configured:
        torch.set_num_threads(configured)
        return None
    if isinstance(recommended, int):
        torch.set_num_threads(recommended)
        return None
    if recommended == "auto" and not os.environ.get("OMP_NUM_THREADS"):
        return ThreadGovernor()
    return None
