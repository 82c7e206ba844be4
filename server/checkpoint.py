"""A checkpoint after every round: the global model and the server optimiser's state.

Written to a temporary folder and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

FOLDER = "checkpoint"


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    arrays: dict[str, np.ndarray],
    strategy_state: dict[str, dict[str, np.ndarray]],
    extra: dict | None = None,
) -> None:
    final = run_dir / FOLDER
    tmp = run_dir / f".{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp / "model.safetensors")
    flat = {
        f"{name}/{k}": np.ascontiguousarray(v)
        for name, part in strategy_state.items()
        for k, v in part.items()
    }
    if flat:
        save_file(flat, tmp / "strategy.safetensors")
    (tmp / "round.json").write_text(json.dumps({"round": server_round, **(extra or {})}))
    old = run_dir / f".{FOLDER}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path) -> tuple[int, dict, dict, dict] | None:
    """(last round, model arrays, strategy state, extra), or None if there is no checkpoint."""
    folder = run_dir / FOLDER
    if not (folder / "round.json").is_file():
        return None
    extra = json.loads((folder / "round.json").read_text())
    server_round = int(extra.pop("round"))
    arrays = load_file(folder / "model.safetensors")
    state: dict[str, dict[str, np.ndarray]] = {}
    if (folder / "strategy.safetensors").is_file():
        for key, value in load_file(folder / "strategy.safetensors").items():
            name, inner = key.split("/", 1)
            state.setdefault(name, {})[inner] = value
    return server_round, arrays, state, extra
