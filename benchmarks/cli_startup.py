"""How long the command line takes to answer when it needs no model: wall seconds of
``flowdppo --help``, ``--version``, ``recipes``, a config error, and ``import flowdppo``,
each in a fresh Python process, beside the interpreter's own start and ``import torch``
(what these commands avoid importing).

The commands are timed round-robin (one run of each, then the next round), so that load
from other jobs on a shared machine falls on all of them alike; the median of
``--repeats`` rounds is reported, with the fastest and slowest. One extra, untimed run of
each says whether it imported torch. Runs in a temporary directory (nothing is written
where it is started).

    python benchmarks/cli_startup.py                 # 15 rounds
    python benchmarks/cli_startup.py --repeats 31 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CLI = "import sys; from flowdppo.cli import main; sys.exit(main(sys.argv[1:]))"
# name -> the Python arguments after the interpreter
COMMANDS = {
    "python -c pass (interpreter start)": ["-c", "pass"],
    "import flowdppo": ["-c", "import flowdppo"],
    "flowdppo --help": ["-c", CLI, "--help"],
    "flowdppo --version": ["-c", CLI, "--version"],
    "flowdppo recipes": ["-c", CLI, "recipes"],
    "flowdppo train nosuch.key=3 (config error)": ["-c", CLI, "train", "nosuch.key=3"],
    "import torch (for scale)": ["-c", "import torch"],
}
# Run the command, then say on stderr whether torch was imported along the way.
PROBE = (
    "import sys\n"
    "sys.argv = ['flowdppo', *sys.argv[1:]]\n"
    "try:\n"
    "    exec(compile({code!r}, '<command>', 'exec'), {{'__name__': '__main__'}})\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
)


def run(args: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return time.perf_counter() - start


def imports_torch(args: list[str], cwd: str) -> bool:
    code, rest = args[1], args[2:]
    probe = PROBE.format(code=code)
    out = subprocess.run(
        [sys.executable, "-c", probe, *rest], cwd=cwd, capture_output=True, text=True
    ).stderr
    return "TORCH True" in out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    ns = p.parse_args()
    if ns.repeats < 1:
        p.error(f"--repeats must be at least 1, got {ns.repeats}")
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory(prefix="flowdppo-startup-") as cwd:
        torch = {name: imports_torch(args, cwd) for name, args in COMMANDS.items()}
        for args in COMMANDS.values():  # one untimed warm-up (disk cache)
            run(args, cwd)
        for _ in range(ns.repeats):
            for name, args in COMMANDS.items():
                times[name].append(run(args, cwd))
    rows = [
        {
            "command": name,
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "imports_torch": torch[name],
        }
        for name, t in times.items()
    ]
    print(
        f"{sys.executable}, {os.cpu_count()} logical CPUs, {ns.repeats} rounds, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':<{width}}  median s   min s   max s  imports torch")
    for r in rows:
        print(
            f"{r['command']:<{width}}  {r['median_s']:8.2f} {r['min_s']:7.2f} {r['max_s']:7.2f}  "
            f"{'yes' if r['imports_torch'] else 'no'}"
        )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"repeats": ns.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
