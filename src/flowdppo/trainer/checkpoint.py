"""Checkpoints: written atomically, verified on load, the last K kept.

A checkpoint is a directory ``ckpt-<iteration>`` holding ``model.safetensors`` (trainable
tensors), ``optimizer.safetensors`` (optimizer tensors and RNG states) and ``state.json``
(everything else, plus a SHA-256 of each tensor file). It is written under a temporary
name, flushed and fsynced, then renamed; only then does the ``latest`` pointer move, itself
by an atomic rename. A kill at any point leaves the previous checkpoint intact. Nothing is
unpickled: tensors load through safetensors, state through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict,
    keep: int,
) -> Path:
    """Write ``ckpt-<iteration>`` atomically, move ``latest`` to it, prune old ones."""
    run_dir = Path(run_dir)
    name = f"ckpt-{iteration:06d}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    optim_tensors.update({f"rng.{k}": v for k, v in rng.items()})
    save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    save_file(optim_tensors, tmp / "optimizer.safetensors")
    files = ["model.safetensors", "optimizer.safetensors"]
    for f in files:
        with open(tmp / f, "rb+") as fh:
            os.fsync(fh.fileno())
    payload = {
        "iteration": iteration,
        "optimizer": optim_meta,
        "state": state,
        "sha256": {f: _sha256(tmp / f) for f in files},
    }
    write_text_atomic(tmp / "state.json", json.dumps(payload, indent=1))
    if final.exists():  # a checkpoint of this iteration from a run that was killed later
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    write_text_atomic(run_dir / LATEST, name + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("ckpt-*") if p.is_dir())


def latest_checkpoint(run_dir: Path) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        path = run_dir / pointer.read_text().strip()
        if path.is_dir():
            return path
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """Verify and read a checkpoint: (payload, model tensors, optimizer state, rng)."""
    path = Path(path)
    try:
        payload = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable state.json: {exc}") from exc
    for name, digest in payload["sha256"].items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(
                f"checkpoint file {f} is missing or corrupt (checksum mismatch); "
                "resume from an earlier checkpoint by pointing 'latest' at it"
            )
    model = load_file(path / "model.safetensors")
    extra = load_file(path / "optimizer.safetensors")
    rng = {k.removeprefix("rng."): v for k, v in extra.items() if k.startswith("rng.")}
    optim = _unflatten_optimizer(extra, payload["optimizer"])
    return payload, model, optim, rng
