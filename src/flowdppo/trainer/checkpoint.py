"""Checkpoints: written atomically, verified on load, the last K kept.

A checkpoint is a directory ``ckpt-<iteration>`` holding ``model.safetensors`` (trainable
tensors), ``optimizer.safetensors`` (optimizer tensors and RNG states), with EMA on
``ema.safetensors`` (the moving average of the trainable tensors), and ``state.json``
(everything else, plus a SHA-256 of each tensor file). It is written under a temporary
name, flushed and fsynced, then renamed; only then does the ``latest`` pointer move, itself
by an atomic rename. A kill at any point leaves the previous checkpoint intact. Nothing is
unpickled: tensors load through safetensors, state through JSON.

Old checkpoints are removed by first renaming them to a hidden ``.ckpt-*.trash`` name, so a
kill in the middle of a removal never leaves a half-deleted ``ckpt-*`` that looks valid;
hidden leftovers (``.tmp``, ``.trash``) are cleared by the next save. A write that fails
(full disk, read-only file system) removes its temporary directory and raises
:class:`CheckpointError`; the checkpoints already on disk are not touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flowdppo.trainer.faults import fault_point
from flowdppo.trainer.watchdog import mark

LATEST = "latest"
EMA_FILE = "ema.safetensors"
_NAME = re.compile(r"ckpt-\d{6,}")
#: Keys every checkpoint's state.json holds.
PAYLOAD_KEYS = ("iteration", "optimizer", "state", "sha256")


class CheckpointError(RuntimeError):
    pass


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise named(exc, path) from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all; a failed write leaves no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise named(exc, path) from exc
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def named(exc: OSError, path: Path) -> OSError:
    """``exc`` as the failure to write ``path`` (not its temporary name, or no name)."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous()
            else:
                meta["state"][str(pid)][key] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _remove(path: Path) -> None:
    """Remove a file or a directory tree if it is there; errors are left to the caller's
    next check (a leftover is cleared by the next save)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _discard(path: Path) -> None:
    """Remove a checkpoint directory so that a kill midway leaves no half-deleted ckpt-*."""
    trash = path.with_name(f".{path.name}.trash")
    _remove(trash)
    os.replace(path, trash)
    _remove(trash)


def _clear_leftovers(run_dir: Path) -> None:
    """Temporary and half-removed checkpoints (and pointer files) left by a killed save."""
    for p in [*run_dir.glob(".ckpt-*.tmp"), *run_dir.glob(".ckpt-*.trash")]:
        _remove(p)
    _remove(run_dir / f"{LATEST}.tmp")


def layout_problem(run_dir: Path) -> str | None:
    """What replaced flowdppo's files in ``run_dir``, if anything: a ``latest`` that is not a
    file, or a ``ckpt-*`` that is not a directory. Saving would overwrite it, and resuming
    would silently skip it."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_dir():
        return (
            f"{pointer} is a directory, not the one-line file naming the newest checkpoint "
            "that flowdppo writes there"
        )
    for p in sorted(run_dir.glob("ckpt-*")):
        if _NAME.fullmatch(p.name) and not p.is_dir():
            return (
                f"{p} is not a checkpoint directory (flowdppo writes each checkpoint as a "
                "directory; this is a file or a broken link)"
            )
    return None


def check_layout(run_dir: Path, doing: str) -> None:
    """Raise :class:`CheckpointError` (``doing``: what cannot be done) on a
    :func:`layout_problem`, naming the path and the fix."""
    problem = layout_problem(run_dir)
    if problem is not None:
        raise CheckpointError(
            f"{doing}: {problem}. Move it out of {run_dir}, then continue with --resume {run_dir}"
        )


def failure_fix(exc: BaseException, place: Path) -> str:
    """What to do about a failed write into ``place``, by its cause (only a full disk is
    the disk's)."""
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors reports the kernel's error as text: "(os error 28)"
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "Free disk space"
    if code == errno.EFBIG:
        return "Free disk space or raise the file-size limit (ulimit -f)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Make {place} writable"
    if code in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY):
        return f"Move away what stands where flowdppo writes in {place}"
    if code == errno.ENAMETOOLONG:
        return "Choose a shorter path"
    return "Fix the cause above"


def describe_failure(exc: OSError) -> str:
    """``PATH: cause`` of a failed file operation (the cause alone when no path is known)."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {cause}" if exc.filename else cause


def _advice(exc: BaseException, run_dir: Path) -> str:
    if latest_checkpoint(run_dir) is None:  # nothing to resume: the run starts again
        return f"{failure_fix(exc, run_dir)}, then start the run again with the same command"
    return f"{failure_fix(exc, run_dir)}, then continue with --resume {run_dir}"


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict,
    rng: dict[str, torch.Tensor],
    state: dict,
    keep: int,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``ckpt-<iteration>`` atomically, move ``latest`` to it, prune old ones."""
    run_dir = Path(run_dir)
    name = name_of(iteration)
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    stage, kept = "write", "no earlier checkpoint exists"
    try:
        mark("checkpoint")
        _clear_leftovers(run_dir)
        newest = latest_checkpoint(run_dir)
        if newest is not None:
            kept = f"the newest complete checkpoint, {newest.name}, is intact"
        check_layout(run_dir, f"could not write checkpoint {final} ({kept})")
        tmp.mkdir(parents=True)
        _write_files(tmp, model_state, optimizer, rng, state, iteration, ema)
        if final.exists():  # a checkpoint of this iteration from a run that was killed later
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(run_dir)
        stage = "pointer"
        fault_point("checkpoint:renamed")
        write_text_atomic(run_dir / LATEST, name + "\n")
        stage = "prune"
        for old in list_checkpoints(run_dir)[:-keep]:
            fault_point("checkpoint:pruning")
            _discard(old)
    except CheckpointError:
        _remove(tmp)
        raise
    except (OSError, SafetensorError) as exc:
        _remove(tmp)
        _clear_leftovers(run_dir)
        advice = _advice(exc, run_dir)
        if stage == "write":
            what = f"could not write checkpoint {final} ({exc}); {kept}"
        elif stage == "pointer":
            what = (
                f"checkpoint {final} is written, but {run_dir / LATEST} could not be moved to "
                f"it ({exc})"
            )
        else:
            what = f"checkpoint {final} is written, but an older one could not be removed ({exc})"
        raise CheckpointError(f"{what}. {advice}") from exc
    return final


def _write_files(
    tmp: Path,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict,
    rng: dict[str, torch.Tensor],
    state: dict,
    iteration: int,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    # An optimizer, or its state dict (under FSDP assembled from every process's shards).
    optim_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    optim_tensors, optim_meta = _flatten_optimizer(optim_state)
    optim_tensors.update({f"rng.{k}": v for k, v in rng.items()})
    save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    save_file(optim_tensors, tmp / "optimizer.safetensors")
    files = ["model.safetensors", "optimizer.safetensors"]
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, tmp / EMA_FILE)
        files.append(EMA_FILE)
    for f in files:
        with open(tmp / f, "rb+") as fh:
            os.fsync(fh.fileno())
    mark("checkpoint")
    fault_point("checkpoint:tensors")
    payload = {
        "iteration": iteration,
        "optimizer": optim_meta,
        "state": state,
        "sha256": {f: _sha256(tmp / f) for f in files},
    }
    write_text_atomic(tmp / "state.json", json.dumps(payload, indent=1))


def name_of(iteration: int) -> str:
    return f"ckpt-{iteration:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("ckpt-*") if p.is_dir())


def latest_checkpoint(run_dir: Path) -> Path | None:
    return resolve_latest(run_dir)[0]


def resolve_latest(run_dir: Path) -> tuple[Path | None, str | None]:
    """The checkpoint ``latest`` names, else the newest on disk; and what was wrong, if any.

    No ``latest`` at all is normal (a kill between the first checkpoint's rename and the
    pointer's write); a ``latest`` that names nothing usable is reported, since resuming
    from another checkpoint than the one recorded deserves a word.
    """
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    found = list_checkpoints(run_dir)
    fallback = found[-1] if found else None
    if not pointer.exists():
        return fallback, None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except IsADirectoryError:
        problem = f"{pointer} is a directory, not the pointer file flowdppo writes"
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"{pointer} cannot be read ({exc})"
    else:
        if _NAME.fullmatch(name) and (run_dir / name).is_dir():
            return run_dir / name, None
        if not _NAME.fullmatch(name):
            problem = f"{pointer} holds {name[:40]!r}, not a checkpoint name"
        elif (run_dir / name).exists() or (run_dir / name).is_symlink():
            problem = f"{pointer} names {name!r}, which is not a checkpoint directory"
        else:
            problem = f"{pointer} names {name!r}, which does not exist"
    then = (
        f"using {fallback.name}, the newest checkpoint in {run_dir}"
        if fallback is not None
        else "and no checkpoint is left"
    )
    return fallback, f"{problem}; {then}"


def mismatch(
    path: Path,
    saved: dict[str, torch.Tensor],
    current: dict[str, torch.Tensor],
    saved_config: dict | None,
    config: dict,
) -> str | None:
    """Why checkpoint tensors ``saved`` cannot load into a model whose ``current`` trainable
    tensors they should fill (names or shapes differ), naming the config keys that changed
    since the checkpoint was written (``saved_config``, absent in older checkpoints)."""
    if set(saved) != set(current):
        what = f"checkpoint {path} does not match this model's trainable parameters"
    else:
        wrong = [k for k in current if tuple(saved[k].shape) != tuple(current[k].shape)]
        if not wrong:
            return None
        k = wrong[0]
        what = (
            f"checkpoint {path} does not fit this model: {len(wrong)} trainable tensors "
            f"differ in shape, e.g. {k} is {list(saved[k].shape)} in the checkpoint and "
            f"{list(current[k].shape)} in the model this config builds"
        )
    changed = _changed(saved_config, config) if saved_config is not None else []
    if changed:
        return (
            f"{what}; the run's config.yaml changed since it was written: {', '.join(changed)}. "
            "Set those keys back to the checkpoint's values, or start a new run"
        )
    return f"{what} (was it written with another model or fine-tuning mode?)"


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs, ``log.*`` aside (where it writes)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = prefix + key
        if dotted == "log":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def verify_checkpoint(path: Path) -> dict:
    """Check a checkpoint's state.json and the checksum of every tensor file; the payload."""
    path = Path(path)
    try:
        payload = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable state.json: {exc}") from exc
    missing = [k for k in PAYLOAD_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing or not isinstance(payload["sha256"], dict):
        raise CheckpointError(
            f"checkpoint {path}: state.json lacks {missing or ['sha256']}; it was not written "
            "by flowdppo or has been edited"
        )
    names = ("model.safetensors", "optimizer.safetensors")
    for name in names + tuple(sorted(set(payload["sha256"]) - set(names))):
        digest = payload["sha256"].get(name)
        f = path / name
        if digest is None or not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is missing or corrupt (checksum mismatch)")
    return payload


def newest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``ckpt-*`` of ``run_dir`` that passes :func:`verify_checkpoint`."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """Verify and read a checkpoint: (payload, model tensors, optimizer state, rng)."""
    path = Path(path)
    payload = verify_checkpoint(path)
    try:
        model = load_file(path / "model.safetensors")
        extra = load_file(path / "optimizer.safetensors")
        rng = {k.removeprefix("rng."): v for k, v in extra.items() if k.startswith("rng.")}
        optim = _unflatten_optimizer(extra, payload["optimizer"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} could not be read ({exc})") from exc
    return payload, model, optim, rng


def load_ema(path: Path) -> dict[str, torch.Tensor] | None:
    """The EMA tensors of a checkpoint that :func:`load_checkpoint` verified; None when the
    run kept no EMA."""
    f = Path(path) / EMA_FILE
    if not f.is_file():
        return None
    try:
        return load_file(f)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path} could not be read ({exc})") from exc
