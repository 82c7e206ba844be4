"""A checkpoint after every round: the global model, the strategy's state, the devices' privacy
reports. Written to a temporary folder and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

FOLDER = "checkpoint"


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]  # the global model's trainable tensors
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    device_privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # PrivacyLedger
    metrics: dict[str, Any] = field(default_factory=dict)  # the round's metrics row


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    final = run_dir / FOLDER
    tmp = run_dir / f".{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in checkpoint.arrays.items()}
    save_file(arrays, tmp / "model.safetensors")
    flat = {
        f"{name}/{k}": np.ascontiguousarray(v)
        for name, part in checkpoint.strategy_state.items()
        for k, v in part.items()
    }
    if flat:
        save_file(flat, tmp / "strategy.safetensors")
    meta = {
        "round": checkpoint.round,
        "privacy": checkpoint.device_privacy,
        "metrics": checkpoint.metrics,
    }
    (tmp / "round.json").write_text(json.dumps(meta))
    old = run_dir / f".{FOLDER}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last completed round's checkpoint, or None if there is none."""
    folder = run_dir / FOLDER
    if not (folder / "round.json").is_file():
        return None
    meta = json.loads((folder / "round.json").read_text())
    state: dict[str, dict[str, np.ndarray]] = {}
    if (folder / "strategy.safetensors").is_file():
        for key, value in load_file(folder / "strategy.safetensors").items():
            name, inner = key.split("/", 1)
            state.setdefault(name, {})[inner] = value
    return Checkpoint(
        round=int(meta["round"]),
        arrays=load_file(folder / "model.safetensors"),
        strategy_state=state,
        device_privacy=meta.get("privacy", {}),
        metrics=meta.get("metrics", {}),
    )
