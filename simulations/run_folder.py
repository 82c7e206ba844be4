"""A run folder: what `fedtrust simulate` / `train` write and every later command reads.

`config.toml` (the resolved config), `metrics.jsonl` (one line per round), `checkpoint/`,
`summary.json`, `model/` (transformers format). One place knows the layout and loads a trained
run, whichever command asks (attacks, fairness audits, cohort reports).
"""

from __future__ import annotations

import json
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
    (run_dir / CONFIG_FILE).write_text(tomli_w.dumps(cfg.to_dict()))


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: not a fedtrust run folder (no {CONFIG_FILE})")
    return load_config(path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl, one per round (round 0 = the initial model)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
