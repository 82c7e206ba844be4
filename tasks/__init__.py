"""Tasks: dataset + tokenizer + model + loss + metrics, built from the [task] config section."""

from __future__ import annotations

from .base import Task, load_trainable_state, trainable_state
from .data import DataError, load_raw


def build_task(cfg, seed: int = 0) -> Task:
    """Load the data named by `cfg` (a TaskConfig) and encode it once."""
    from .intent import build_intent_task
    from .lm import build_lm_task

    raw = load_raw(
        cfg.dataset,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        device_column=cfg.device_column,
        cohort_column=cfg.cohort_column,
        need_label=cfg.kind == "intent",
        test_fraction=cfg.test_fraction,
        seed=seed,
    )
    return build_intent_task(raw, cfg) if cfg.kind == "intent" else build_lm_task(raw, cfg)


__all__ = ["DataError", "Task", "build_task", "load_raw", "load_trainable_state", "trainable_state"]
