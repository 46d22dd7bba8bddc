"""What a command prints: quiet third-party libraries unless ``--verbose``, a line for
each slow phase, and output that outlives a closed pipe.

Loading a diffusers pipeline prints a progress bar per component and transformers warns
about things a user of this package cannot change (advisory notes, deprecations inside
the libraries). The command line calls :func:`set_verbose` before any of them is imported;
the variables it sets are what those libraries read at import, and a library already
imported is switched through its own API.

A phase that can take more than a few seconds before the first progress line (building
the rewards, loading the base model, restoring a checkpoint, evaluating the base model,
the first iteration) announces itself with :func:`phase`, so that a run, on a terminal or
in a log file, is never silent for long. The command line turns these lines on
(:func:`show_phases`, in one process of a multi-process job); library use stays silent.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TextIO

LIBRARIES = ("transformers", "diffusers", "peft", "huggingface_hub", "accelerate")
_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
_verbose = True
_phases = False


def verbose() -> bool:
    return _verbose


def set_verbose(on: bool) -> None:
    """``on``: the libraries as they are. Off: their warnings, info logs and progress bars
    are silenced (errors still show); a variable the user set stays as set."""
    global _verbose
    _verbose = on
    if on:
        return
    for key, value in _ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for name in LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_progress_bars()


def quiet_progress_bars() -> None:
    """Switch off the progress bars of the libraries imported so far (unless verbose);
    called again where a pipeline is about to load."""
    if _verbose:
        return
    for name in ("diffusers", "transformers"):
        if f"{name}.utils.logging" in sys.modules:
            lib = sys.modules[f"{name}.utils.logging"]
            lib.disable_progress_bar()
            lib.set_verbosity_error()


def show_phases(on: bool) -> None:
    """Whether :func:`phase` prints (the command line's choice)."""
    global _phases
    _phases = on


def phase(text: str) -> None:
    """``flowdppo: TEXT...`` as a slow phase begins, when the command line asked for it."""
    if _phases:
        echo(f"flowdppo: {text}...")


def format_duration(seconds: float) -> str:
    """Seconds as a progress bar shows them: ``0:07``, ``12:34``, ``1:02:03``; ``?`` when
    not known yet."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def echo(text: str = "", file: TextIO | None = None) -> None:
    """``print(text, flush=True)`` that outlives its reader: when the pipe it writes to is
    closed (``flowdppo train ... | head -1``, a dying ``tee`` or pager), the output falls
    silent and the command goes on (training keeps going and checkpointing)."""
    stream = sys.stdout if file is None else file
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        drop_closed_output(stream)


def drop_closed_output(stream: TextIO) -> None:
    """Point a stream whose reader went away at /dev/null, as Python's documentation of
    SIGPIPE recommends: what is still written, and the flush at exit (which would otherwise
    end the process with "Exception ignored ... BrokenPipeError" and status 120), go
    nowhere."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
