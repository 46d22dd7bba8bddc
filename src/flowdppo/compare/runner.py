"""Run every planned run, in parallel worker processes (or in this process with jobs=0)."""

from __future__ import annotations

import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flowdppo.compare.experiment import RunSpec
from flowdppo.config import dump_config

WALL_FILE = "compare_wall.json"  # a run's process wall time, kept for --reuse


@dataclass
class RunStatus:
    spec: RunSpec
    ok: bool
    error: str | None  # the last line a failed run printed (its log has the traceback)
    wall_s: float
    log_path: Path | None
    reused: bool = False


def _finished(spec: RunSpec) -> bool:
    return (spec.run_dir / "summary.json").is_file()


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("RUN FAILED: "):
            return ln.removeprefix("RUN FAILED: ")
    return lines[-1] if lines else "no output"


def _run_subprocess(spec: RunSpec, probe: str | None, logs: Path) -> RunStatus:
    config_path = logs / f"{spec.run_id}.yaml"
    config_path.write_text(dump_config(spec.config))
    log_path = logs / f"{spec.run_id}.log"
    cmd = [sys.executable, "-m", "flowdppo.compare.worker", str(config_path)]
    if probe:
        cmd += ["--probe", probe]
    env = dict(os.environ)
    # One thread per run: parallelism comes from --jobs, and oversubscribed threads only slow
    # every run down.
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return _status(spec, rc, time.perf_counter() - start, log_path)


def _run_here(spec: RunSpec, probe: str | None, logs: Path) -> RunStatus:
    from flowdppo.compare.worker import train_run

    config_path = logs / f"{spec.run_id}.yaml"
    config_path.write_text(dump_config(spec.config))
    start = time.perf_counter()
    try:
        train_run(str(config_path), probe)
    except Exception as exc:  # noqa: BLE001 - reported in the table, the comparison goes on
        log_path = logs / f"{spec.run_id}.log"
        log_path.write_text(traceback.format_exc())
        return RunStatus(
            spec, False, f"{type(exc).__name__}: {exc}", time.perf_counter() - start, log_path
        )
    return RunStatus(spec, True, None, time.perf_counter() - start, None)


def _forked_child(spec: RunSpec, probe: str | None, config_path: Path, log_path: Path) -> None:
    """Body of a forked run: output to its log, exit status 0 (finished) or 1 (failed)."""
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # The parent's sys.stdout may not be fd 1 (pytest, notebooks): write to the log.
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        if "OMP_NUM_THREADS" not in os.environ:
            import torch

            # One thread, as a subprocess run gets; the variable also tells the trainer
            # not to follow the idle cores (trainer/threads.py).
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)
        from flowdppo.compare.worker import main

        code = main([str(config_path), *(["--probe", probe] if probe else [])])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _status(spec: RunSpec, rc: int | None, wall: float, log_path: Path) -> RunStatus:
    if rc == 0 and _finished(spec):
        return RunStatus(spec, True, None, wall, log_path)
    text = log_path.read_text() if log_path.is_file() else ""
    error = _last_error(text)
    if rc == 0:
        error = f"the run exited without writing summary.json ({error})"
    elif rc is not None and rc < 0:
        error = f"killed by signal {-rc} ({error})"
    return RunStatus(spec, False, f"exit {rc}: {error}", wall, log_path)


def _preload() -> None:
    # Imported once in the parent, so that every forked run starts in a fraction of a second
    # instead of re-importing torch and peft.
    import peft  # noqa: F401

    import flowdppo.compare.ratio_noise  # noqa: F401
    import flowdppo.compare.worker  # noqa: F401
    import flowdppo.trainer.loop  # noqa: F401


def run_all(
    runs: list[RunSpec],
    out_dir: Path,
    jobs: int = 1,
    probe: str | None = None,
    reuse: bool = False,
    echo: Callable[[str], None] = print,
) -> list[RunStatus]:
    """Run ``runs``, ``jobs`` at a time, each in its own process (0: in this process).

    Runs are forked from this process where the platform allows (fast start, one
    interpreter's imports) and started as fresh interpreters otherwise. With ``reuse`` a
    run whose directory already holds ``summary.json`` is not run again. A failed run never
    stops the others; its status carries the error.
    """
    logs = Path(out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    total = len(runs)
    statuses: dict[int, RunStatus] = {}

    def report(i: int, status: RunStatus) -> None:
        statuses[i] = status
        wall_file = status.spec.run_dir / WALL_FILE
        if status.ok and not status.reused:
            wall_file.write_text(json.dumps({"wall_s": status.wall_s}))
        elif status.reused and wall_file.is_file():
            status.wall_s = json.loads(wall_file.read_text())["wall_s"]
        spec = status.spec
        what = "reused" if status.reused else ("ok" if status.ok else f"FAILED ({status.error})")
        echo(
            f"[{len(statuses)}/{total}] {spec.group} seed {spec.seed}: {what} ({status.wall_s:.0f} s)"
        )

    todo = []
    for i, spec in enumerate(runs):
        if reuse and _finished(spec):
            report(i, RunStatus(spec, True, None, 0.0, None, reused=True))
            continue
        if spec.run_dir.exists():  # an unfinished attempt: start it over
            shutil.rmtree(spec.run_dir)
        todo.append(i)

    if jobs == 0:
        for i in todo:
            report(i, _run_here(runs[i], probe, logs))
    elif "fork" not in mp.get_all_start_methods():
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {i: pool.submit(_run_subprocess, runs[i], probe, logs) for i in todo}
            for i, fut in futures.items():
                report(i, fut.result())
    else:
        _preload()
        ctx = mp.get_context("fork")
        running: dict[int, tuple[int, mp.process.BaseProcess, float, Path]] = {}
        while todo or running:
            while todo and len(running) < jobs:
                i = todo.pop(0)
                spec = runs[i]
                config_path = logs / f"{spec.run_id}.yaml"
                config_path.write_text(dump_config(spec.config))
                log_path = logs / f"{spec.run_id}.log"
                proc = ctx.Process(target=_forked_child, args=(spec, probe, config_path, log_path))
                sys.stdout.flush()
                sys.stderr.flush()
                proc.start()
                running[proc.sentinel] = (i, proc, time.perf_counter(), log_path)
            for sentinel in mp_connection.wait(list(running)):
                i, proc, start, log_path = running.pop(sentinel)
                proc.join()
                report(i, _status(runs[i], proc.exitcode, time.perf_counter() - start, log_path))
    return [statuses[i] for i in range(total)]
