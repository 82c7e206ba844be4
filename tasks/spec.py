"""What a task is made of: the `[task]` section of a run config, typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TaskSpec:
    """The `[task]` section.

    Data: `dataset` is the training data. `test_dataset` (same formats, same column names)
    gives the test split: then all of `dataset` is training data and `test_fraction` is not
    used; without it the dataset's own test split is used (bundled CLINC150, hub datasets), else
    `test_fraction` of `dataset` is held out. `validation_dataset` gives the split a threshold is
    tuned on (intent: the out-of-scope rejection threshold); without it the dataset's own
    validation split is used when it has one (bundled CLINC150, hub datasets) and a user file has
    none: validation is never carved out of the training data. For intent classification every
    test/validation label must occur in the training data (a one-line error names the file, line
    and label). A bundled name or hub id as test/validation data gives its test/validation split.
    """

    kind: Literal["intent", "lm"] = "intent"
    dataset: str = "clinc150"  # bundled name, a .jsonl/.json/.csv file, or a Hugging Face hub id
    test_dataset: str = ""  # the test split from its own file or hub id ("" = see above)
    validation_dataset: str = ""  # the split thresholds are tuned on ("" = the dataset's own)
    model: str = "minilm"  # intent: "minilm" (bundled), a local transformers folder or a hub id
    text_column: str = "text"
    label_column: str = "label"
    device_column: str = "device"
    cohort_column: str = ""  # a per-device attribute (e.g. region) reported as cohorts
    test_fraction: float = 0.1  # held out when there is no test split (nor test_dataset)
    max_length: int = 32  # tokens per example (intent) or characters per example (lm)
    freeze_embeddings: bool = True
    freeze_layers: int = 2  # lowest encoder layers kept frozen
    lm_layers: int = 2
    lm_width: int = 128
    lm_heads: int = 4
