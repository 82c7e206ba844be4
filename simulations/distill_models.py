"""The distillation run's models: a given teacher, parameter counts, finished stages on disk.

Every trained model is saved in its own folder of the run (`teacher/`, `student-<variant>/`) with a
stage file holding a digest of the settings it was trained with: a later run with the same run
folder and the same settings loads it instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedtrust.errors import ConfigError

STAGE_FILE = "fedtrust_stage.json"


def n_params(model: nn.Module) -> int:
    """Parameters, counting tied embeddings once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_given_teacher(name: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`teacher.model`: a local folder saved with `save_pretrained`, or a hub id (online)."""
    local = Path(name).expanduser()
    if (local.exists() or name.startswith((".", "/", "~"))) and not (
        local / "config.json"
    ).is_file():  # a path, not a hub id: say so without asking the hub
        raise ConfigError(f"teacher.model = {name!r}: no config.json in that folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        teacher = AutoModelForCausalLM.from_pretrained(name)
    except OSError as err:
        raise ConfigError(
            f"teacher.model = {name!r}: not a local model folder and not loadable from "
            f"the Hugging Face hub (offline? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')})"
        ) from err
    return teacher, tokenizer


def digest(*parts: Any) -> str:
    """A short hash of the settings a stage depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished(folder: Path, stage_digest: str) -> dict[str, Any] | None:
    """The stage info saved in `folder` if it was trained with these settings, else None."""
    marker = folder / STAGE_FILE
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("digest") == stage_digest:
            return {k: v for k, v in info.items() if k != "digest"}
    return None


def save_stage(
    folder: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    stage_digest: str,
    info: dict[str, Any],
) -> None:
    """Save model, tokenizer and the stage file (the last, so a crash leaves no finished mark)."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (folder / STAGE_FILE).write_text(json.dumps({"digest": stage_digest, **info}, indent=2) + "\n")
