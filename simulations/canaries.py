"""The canaries a config asks for (`[audit]`), encoded for its task: the secrets `fedtrust audit`
attacks, and those `simulate` / `train` plant with `audit.plant_canaries = true`."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from fedtrust.privacy.attacks.canary import Canary, canary_rows, decoy_rows, make_canaries
from fedtrust.tasks import Task

from .config import Config


def audit_canaries(cfg: Config, task: Task) -> tuple[list[Canary], list[dict[str, Any]]]:
    """The canaries `cfg.audit` asks for and their encoded training rows (deterministic): each
    canary `repetitions` times, then `audit.canary_decoys` decoys per prefix (`canary` = -1).
    None for a task that is not an intent classifier."""
    audit = cfg.audit
    if task.kind != "intent" or not audit.canaries_per_level:
        return [], []
    labels = task.labels  # type: ignore[attr-defined] - an IntentTask
    canaries = make_canaries(
        labels,
        repetitions=tuple(audit.canary_repetitions),
        per_level=audit.canaries_per_level,
        seed=cfg.run.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(task.model_name)  # type: ignore[attr-defined]
    rows = canary_rows(canaries, tokenizer, labels, cfg.task.max_length)
    decoys = decoy_rows(
        canaries, tokenizer, labels, cfg.task.max_length, audit.canary_decoys, cfg.run.seed
    )
    return canaries, rows + decoys
