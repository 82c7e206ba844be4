"""What a task is made of: the `[task]` section of a run config, typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TaskSpec:
    kind: Literal["intent", "lm"] = "intent"
    dataset: str = "clinc150"  # bundled name, a .jsonl/.json/.csv file, or a Hugging Face hub id
    model: str = "minilm"  # intent: "minilm" (bundled), a local transformers folder or a hub id
    text_column: str = "text"
    label_column: str = "label"
    device_column: str = "device"
    cohort_column: str = ""  # a per-device attribute (e.g. region) reported as cohorts
    test_fraction: float = 0.1  # held out for the server when the data has no test split
    max_length: int = 32  # tokens per example (intent) or characters per example (lm)
    freeze_embeddings: bool = True
    freeze_layers: int = 2  # lowest encoder layers kept frozen
    lm_layers: int = 2
    lm_width: int = 128
    lm_heads: int = 4
