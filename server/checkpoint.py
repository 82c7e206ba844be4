"""A checkpoint after every round: the global model, the strategy's state, the devices' privacy
reports. Crash-safe: a process killed at any point leaves a complete checkpoint to resume from.

A save writes every file into `.checkpoint.tmp/` and fsyncs it (files, then the folder), renames
the current `checkpoint/` to `.checkpoint.old/`, renames the new folder to `checkpoint/` and only
then deletes the old one; every rename is made durable by an fsync of the run folder. A kill
between the two renames leaves no `checkpoint/` but a complete `.checkpoint.old/`, which
`load_checkpoint` falls back to; a `.checkpoint.tmp/` is never loaded. `round.json`, written
last, lists every file with its size, so a truncated or corrupt checkpoint is a one-line
`RunFolderError` naming the file instead of a safetensors or JSON traceback.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedtrust.errors import FederationError, RunFolderError

FOLDER = "checkpoint"
TMP = f".{FOLDER}.tmp"  # being written: never loaded
OLD = f".{FOLDER}.old"  # the previous checkpoint while the new one is renamed into place
META = "round.json"
MODEL = "model.safetensors"
STRATEGY = "strategy.safetensors"


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]  # the global model's trainable tensors
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    device_privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # PrivacyLedger
    metrics: dict[str, Any] = field(default_factory=dict)  # the round's metrics row


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` as `run_dir`/checkpoint/, replacing the previous one atomically.

    A write that fails (a full or read-only disk) is a FederationError naming the path and the
    round; the previous checkpoint stays loadable.
    """
    try:
        _save(run_dir, checkpoint)
    except OSError as err:
        shutil.rmtree(run_dir / TMP, ignore_errors=True)
        where = err.filename or run_dir / FOLDER
        raise FederationError(
            f"{where}: cannot write the checkpoint of round {checkpoint.round} "
            f"({err.strerror or err}); the last good checkpoint in {run_dir} is kept, "
            f"free some space and resume with --resume {run_dir}"
        ) from None


def _save(run_dir: Path, checkpoint: Checkpoint) -> None:
    final, tmp, old = run_dir / FOLDER, run_dir / TMP, run_dir / OLD
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {MODEL: save({k: np.ascontiguousarray(v) for k, v in checkpoint.arrays.items()})}
    flat = {
        f"{name}/{k}": np.ascontiguousarray(v)
        for name, part in checkpoint.strategy_state.items()
        for k, v in part.items()
    }
    if flat:
        files[STRATEGY] = save(flat)
    for name, data in files.items():
        _write(tmp / name, data)
    meta = {
        "round": checkpoint.round,
        "privacy": checkpoint.device_privacy,
        "metrics": checkpoint.metrics,
        "files": {name: len(data) for name, data in files.items()},
    }
    _write(tmp / META, json.dumps(meta).encode())
    _fsync_dir(tmp)
    if final.is_dir():  # else a kill between the renames left `old` as the last good one: keep it
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        _fsync_dir(run_dir)
    tmp.rename(final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write(path: Path, data: bytes) -> None:
    try:
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a failed write() names no file
        raise OSError(err.errno, err.strerror, str(path)) from err


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_folder(run_dir: Path) -> Path | None:
    """The folder holding the last completed round's checkpoint: `checkpoint/`, or the previous
    one (`.checkpoint.old/`) when a save was stopped between its two renames; None if neither."""
    for name in (FOLDER, OLD):
        folder = run_dir / name
        if folder.is_dir() and (name == FOLDER or (folder / META).is_file()):
            return folder
    return None


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last completed round's checkpoint, or None if there is none; a RunFolderError naming
    the file when it is truncated or corrupt."""
    folder = checkpoint_folder(run_dir)
    if folder is None:
        return None
    meta = _read_meta(folder / META)
    sizes = meta.get("files", {MODEL: None})  # checkpoints before `files` was written
    for name, size in sizes.items():
        _check_size(folder / name, size)
    state: dict[str, dict[str, np.ndarray]] = {}
    if STRATEGY in sizes or (folder / STRATEGY).is_file():
        for key, value in _read_tensors(folder / STRATEGY).items():
            name, inner = key.split("/", 1)
            state.setdefault(name, {})[inner] = value
    return Checkpoint(
        round=int(meta["round"]),
        arrays=_read_tensors(folder / MODEL),
        strategy_state=state,
        device_privacy=meta.get("privacy", {}),
        metrics=meta.get("metrics", {}),
    )


def _corrupt(path: Path, why: str) -> RunFolderError:
    return RunFolderError(
        f"{path}: corrupt checkpoint ({why}); restore it from a backup or start a new run"
    )


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _corrupt(path, "missing")
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise _corrupt(path, f"not valid JSON: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("round"), int):
        raise _corrupt(path, "no round number")
    return meta


def _check_size(path: Path, size: int | None) -> None:
    if not path.is_file():
        raise _corrupt(path, "missing")
    actual = path.stat().st_size
    if size is not None and actual != size:
        what = "truncated" if actual < size else "grown"
        raise _corrupt(path, f"{what}: {actual} bytes, {size} were written")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load(path.read_bytes())
    except SafetensorError as err:
        raise _corrupt(path, str(err)) from None
