"""torch's thread count: fixed by the config, a task or OMP_NUM_THREADS, or following the
cores other processes leave idle (trainer/threads.py), re-read after every iteration."""

from __future__ import annotations

import pytest
import torch

from flowdppo.trainer import threads
from flowdppo.trainer.threads import ThreadGovernor, governor_for


class FakeMachine:
    """Two cores: ``/proc/stat``'s ticks, this process's CPU time and the clock, advanced
    by hand (100 ticks a second per core)."""

    def __init__(self, monkeypatch):
        self.busy = self.total = 0
        self.own = self.wall = 0.0
        monkeypatch.setattr(threads, "_cpu_ticks", lambda cpus: (self.busy, self.total))
        monkeypatch.setattr(threads.time, "process_time", lambda: self.own)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(threads.time, "sleep", lambda s: self.run(s, 0, 0))
        monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)

    def run(self, seconds: float, ours: float, others: float) -> None:
        """``seconds`` pass with ``ours`` cores busy in this process, ``others`` elsewhere."""
        self.wall += seconds
        self.own += ours * seconds
        self.busy += round(100 * (ours + others) * seconds)
        self.total += round(100 * 2 * seconds)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_threads")
def test_the_governor_takes_the_cores_others_leave_idle(monkeypatch):
    machine = FakeMachine(monkeypatch)
    torch.set_num_threads(1)
    gov = ThreadGovernor()
    assert gov.threads == 2 and torch.get_num_threads() == 2  # an idle machine
    machine.run(5, ours=1.9, others=0)
    assert gov.adjust() == 2
    machine.run(5, ours=1.0, others=1.0)  # another process took a core
    assert gov.adjust() == 1 and torch.get_num_threads() == 1
    machine.run(5, ours=1.0, others=1.0)  # it still runs: we stay on one core
    assert gov.adjust() == 1
    machine.run(5, ours=1.0, others=0.0)  # it ended: the idle core is ours again
    assert gov.adjust() == 2
    gov.close()
    assert torch.get_num_threads() == 1  # what it was before the run


@pytest.mark.usefixtures("restore_threads")
def test_a_busy_machine_at_the_start_gives_one_thread(monkeypatch):
    machine = FakeMachine(monkeypatch)
    machine.busy, machine.total = 0, 0
    monkeypatch.setattr(threads.time, "sleep", lambda s: machine.run(s, 0, 2.0))
    assert ThreadGovernor().threads == 1


@pytest.mark.usefixtures("restore_threads")
def test_fixed_counts_come_from_the_config_a_task_or_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert governor_for(2, 1) is None and torch.get_num_threads() == 2  # train.threads
    assert governor_for(None, 1) is None and torch.get_num_threads() == 1  # digits: 1
    torch.set_num_threads(2)
    assert governor_for(None, None) is None and torch.get_num_threads() == 2  # left alone
    FakeMachine(monkeypatch)
    assert isinstance(governor_for(None, "auto"), ThreadGovernor)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # flowdppo compare, torchrun
    assert governor_for(None, "auto") is None
    # train.threads: auto asks for the governor on any task, over the environment
    assert isinstance(governor_for("auto", 1), ThreadGovernor)


def test_train_threads_takes_a_count_auto_or_null_and_names_them_when_wrong():
    from flowdppo.config import ConfigError, load_config

    assert load_config(None, ["train.threads=auto"]).train.threads == "auto"
    assert load_config(None, ["train.threads=2"]).train.threads == 2
    assert load_config(None, []).train.threads is None
    for bad in ("0", "many"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"train.threads={bad}"])
        assert "train.threads" in str(err.value)


def test_usable_cpus_is_the_affinity_capped_by_a_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    quota = tmp_path / "cpu.max"
    assert threads.usable_cpus(quota) == 4  # no cgroup file
    quota.write_text("max 100000\n")
    assert threads.usable_cpus(quota) == 4
    quota.write_text("250000 100000\n")  # 2.5 cores: 2 threads
    assert threads.usable_cpus(quota) == 2
    quota.write_text("50000 100000\n")  # half a core: still one thread
    assert threads.usable_cpus(quota) == 1
