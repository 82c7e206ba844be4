"""A run folder: what `fedtrust simulate` / `train` write and every later command reads.

`config.toml` (the resolved config), `metrics.jsonl` (one line per round), `checkpoint/`,
`summary.json`, `model/` (transformers format). One place knows the layout and loads a trained
run, whichever command asks (attacks, fairness audits, cohort reports).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2LMHeadModel,
)

from fedtrust.errors import ModelError, RunFolderError
from fedtrust.tasks import Task, build_task
from fedtrust.tasks.models import quiet_transformers, resolve_model

from .config import Config, load_config

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FOLDER = "model"


def write_config(run_dir: Path, cfg: Config) -> None:
    write_atomic(run_dir / CONFIG_FILE, tomli_w.dumps(cfg.to_dict()))


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` or what it held before, whenever the process is killed (a temporary
    file, fsynced, renamed over it); an OSError leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a failed write() names no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def load_run_config(run_dir: Path) -> Config:
    """The resolved config of a run folder; a one-line RunFolderError (or ConfigError) naming
    the path when the folder is missing, is no run folder or its config.toml is corrupt."""
    if not run_dir.exists():
        raise RunFolderError(f"{run_dir}: no such run folder")
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: not a folder (expected a fedtrust run folder)")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: not a fedtrust run folder (no {CONFIG_FILE})")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path}: corrupt run config, not valid TOML ({err})") from None
    missing = [s for s in ("run", "task") if not isinstance(data.get(s), dict)]
    if missing:
        raise RunFolderError(
            f"{path}: incomplete run config (no [{'], ['.join(missing)}] section); "
            "it is not the config a fedtrust run wrote"
        )
    return load_config(path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl, one per round (round 0 = the initial model). A last line cut
    short (the process was killed while appending it) is dropped; any other bad line is a
    RunFolderError naming the file and line."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            if number == len(lines):  # no newline after it: a torn append
                break
            raise RunFolderError(f"{path}:{number}: corrupt metrics line ({err})") from None
        if not isinstance(row, dict) or "round" not in row:
            raise RunFolderError(f"{path}:{number}: not a metrics row (no round)")
        rows.append(row)
    return rows


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `rows`, atomically (a kill keeps the old file whole)."""
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def run_mode(run_dir: Path) -> str | None:
    """`centralized` for `fedtrust train` runs, None for federated ones."""
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text()).get("mode") if path.is_file() else None


def load_run_model(run_dir: Path) -> tuple[Config, Task, nn.Module]:
    """(config, task, trained model) of a finished `fedtrust simulate` / `train` run."""
    cfg = load_run_config(run_dir)
    if not (run_dir / MODEL_FOLDER / "config.json").is_file():
        raise RunFolderError(
            f"{run_dir}: no trained model (model/config.json missing; did the run finish?)"
        )
    quiet_transformers()
    task = build_task(cfg.task, seed=cfg.run.seed)
    model_class = AutoModelForSequenceClassification if task.kind == "intent" else GPT2LMHeadModel
    return cfg, task, model_class.from_pretrained(run_dir / MODEL_FOLDER)


def load_classifier(folder: Path) -> tuple[nn.Module, Any, Path]:
    """(model, tokenizer, model folder) from a run folder (with model/) or a transformers
    model folder; a ModelError with one clear line when it is neither or no classifier."""
    quiet_transformers()
    if not folder.exists():
        raise ModelError(f"{folder}: no such folder")
    if (folder / MODEL_FOLDER / "config.json").is_file():
        model_dir = folder / MODEL_FOLDER
    elif (folder / "config.json").is_file():
        model_dir = folder
    else:
        raise ModelError(
            f"{folder}: no model (expected model/config.json of a fedtrust run folder, or "
            "config.json of a transformers model folder)"
        )
    config = AutoConfig.from_pretrained(model_dir)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        kind = ", ".join(architectures) or f"{config.model_type} model without a classifier head"
        raise ModelError(f"{model_dir} is a {kind}, not a sequence classifier")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        run_config = model_dir.parent / CONFIG_FILE
        if model_dir == folder or not run_config.is_file():
            raise ModelError(f"{model_dir}: no tokenizer saved with the model ({err})") from err
        name = tomllib.loads(run_config.read_text()).get("task", {}).get("model", "minilm")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer, model_dir
