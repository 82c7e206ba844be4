"""Tasks: dataset + tokenizer + model + loss + metrics, built from a `TaskSpec`."""

from __future__ import annotations

from .base import Task, load_trainable_state, trainable_state
from .data import load_raw
from .intent import build_intent_task
from .lm import build_lm_task
from .rejection import Scores, oos_rejection, rejection_metrics, score_rows, tune_threshold
from .spec import TaskSpec


def build_task(spec: TaskSpec, seed: int = 0) -> Task:
    """Load the data named by `spec` (dataset, test_dataset, validation_dataset) and encode it
    once. Bad data raises `fedtrust.errors.DataError`, one line naming the file and line."""
    raw = load_raw(
        spec.dataset,
        text_column=spec.text_column,
        label_column=spec.label_column,
        device_column=spec.device_column,
        cohort_column=spec.cohort_column,
        need_label=spec.kind == "intent",
        test_fraction=spec.test_fraction,
        seed=seed,
        test_dataset=spec.test_dataset,
        validation_dataset=spec.validation_dataset,
    )
    return build_intent_task(raw, spec) if spec.kind == "intent" else build_lm_task(raw, spec)


__all__ = [
    "Scores",
    "Task",
    "TaskSpec",
    "build_task",
    "load_raw",
    "load_trainable_state",
    "oos_rejection",
    "rejection_metrics",
    "score_rows",
    "trainable_state",
    "tune_threshold",
]
