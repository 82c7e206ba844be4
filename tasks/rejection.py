"""Out-of-scope rejection for intent classifiers: answer "oos" when the model is unsure.

A classifier trained with an out-of-scope class rarely predicts it (CLINC150's `oos` queries
look like nothing in particular). Rejection adds a second way to say out-of-scope: when the
model's confidence in its best in-scope intent is below a threshold, tuned on validation data to
balance in-scope accuracy and out-of-scope recall.

Confidence scores (higher = more in-scope):
- "msp": the maximum softmax probability over the in-scope classes (softmax over all classes);
- "energy": the logsumexp of the in-scope logits (the negative free energy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedtrust.errors import DataError

from .intent import OUT_OF_SCOPE, IntentTask

ScoreKind = Literal["msp", "energy"]


@dataclass
class Scores:
    """Per row, in row order."""

    predicted: np.ndarray  # argmax over all classes
    best_in_scope: np.ndarray  # argmax over the in-scope classes
    confidence: np.ndarray  # higher = more in-scope ("msp" or "energy")
    gold: np.ndarray


@torch.no_grad()
def score_rows(
    task: IntentTask,
    model: nn.Module,
    rows: list[dict[str, Any]],
    score: ScoreKind = "msp",
    batch_size: int = 256,
) -> Scores:
    """Predictions and confidences of `model` on `rows` (eval mode; the mode is restored)."""
    if score not in ("msp", "energy"):
        raise ValueError(f"unknown confidence score {score!r} (use 'msp' or 'energy')")
    oos = task.labels.index(OUT_OF_SCOPE) if OUT_OF_SCOPE in task.labels else -1
    n = len(rows)
    predicted, best, gold = (np.zeros(n, dtype=np.int64) for _ in range(3))
    confidence = np.zeros(n, dtype=np.float64)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for index, batch in task.indexed_batches(rows, batch_size):
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits.double()
            in_scope = logits.clone()
            if oos >= 0:
                in_scope[:, oos] = -torch.inf
            if score == "msp":
                probs = logits.softmax(-1)
                if oos >= 0:
                    probs[:, oos] = -1.0
                conf = probs.max(-1).values
            else:
                conf = in_scope.logsumexp(-1)
            predicted[index] = logits.argmax(-1).cpu().numpy()
            best[index] = in_scope.argmax(-1).cpu().numpy()
            confidence[index] = conf.cpu().numpy()
            gold[index] = batch["labels"].numpy()
    finally:
        model.train(was_training)
    return Scores(predicted=predicted, best_in_scope=best, confidence=confidence, gold=gold)


def rejection_metrics(scores: Scores, oos_label: int, threshold: float) -> dict[str, float]:
    """Metrics of: predict out-of-scope if the model does or its confidence < `threshold`,
    else its best in-scope intent. Rejected in-scope rows count as wrong; `rejected_share` is
    the share of all rows predicted out-of-scope (either way). Empty groups score 0."""
    rejected = (scores.predicted == oos_label) | (scores.confidence < threshold)
    prediction = np.where(rejected, oos_label, scores.best_in_scope)
    correct = prediction == scores.gold
    is_oos = scores.gold == oos_label
    return {
        "in_scope_accuracy": _mean(correct[~is_oos]),
        "oos_recall": _mean(correct[is_oos]),
        "accuracy": _mean(correct),
        "rejected_share": _mean(rejected),
        "threshold": float(threshold),
    }


def tune_threshold(
    scores: Scores, oos_label: int, objective: Literal["balanced"] = "balanced"
) -> float:
    """The threshold maximising (in-scope accuracy + out-of-scope recall) / 2.

    One sorted sweep over the distinct confidences: threshold u rejects the rows with
    confidence < u. The lowest confidence (reject nothing) is a candidate. Of equally good
    thresholds the lowest wins; it is returned as the midpoint of its gap to the next lower
    confidence, so the same rows are rejected and unseen rows fall on the safe side of the gap.
    """
    if objective != "balanced":
        raise ValueError(f"unknown objective {objective!r} (use 'balanced')")
    if len(scores.confidence) == 0:
        raise ValueError("no scored rows to tune a threshold on")
    order = np.argsort(scores.confidence, kind="stable")
    conf = scores.confidence[order]
    is_oos = scores.gold[order] == oos_label
    says_oos = scores.predicted[order] == oos_label
    # kept in-scope rows are right iff the model's best in-scope intent is gold
    in_hit = ~is_oos & ~says_oos & (scores.best_in_scope[order] == scores.gold[order])
    # out-of-scope rows are right if the model says so, or once rejected
    oos_gain = is_oos & ~says_oos
    candidates = np.unique(conf)
    below = np.searchsorted(conf, candidates, side="left")  # rows rejected by each candidate
    in_cum = np.concatenate([[0], np.cumsum(in_hit)])
    oos_cum = np.concatenate([[0], np.cumsum(oos_gain)])
    in_total, oos_total = max(int((~is_oos).sum()), 1), max(int(is_oos.sum()), 1)
    in_acc = (in_cum[-1] - in_cum[below]) / in_total
    oos_recall = (int((is_oos & says_oos).sum()) + oos_cum[below]) / oos_total
    best = int(np.argmax((in_acc + oos_recall) / 2))
    if best == 0:
        return float(candidates[0])
    return float((candidates[best - 1] + candidates[best]) / 2)


def oos_rejection(task: IntentTask, model: nn.Module, score: ScoreKind = "msp") -> dict[str, Any]:
    """Tune a rejection threshold on `task.validation`, report it on `task.test`.

    Returns {"score", "threshold", "validation", "test", "test_without_rejection"}; the last is
    the plain argmax (its metrics lack "threshold").
    """
    if OUT_OF_SCOPE not in task.labels:
        raise DataError(
            f"out-of-scope rejection needs an {OUT_OF_SCOPE!r} label; the task has none"
        )
    if not task.validation:
        raise DataError(
            "out-of-scope rejection needs validation rows to tune on; the data has none"
        )
    oos = task.labels.index(OUT_OF_SCOPE)
    val = score_rows(task, model, task.validation, score)
    if not (val.gold == oos).any() or (val.gold == oos).all():
        raise DataError(
            f"out-of-scope rejection needs both {OUT_OF_SCOPE!r} and in-scope validation rows"
        )
    test = score_rows(task, model, task.test, score)
    threshold = tune_threshold(val, oos)
    plain = rejection_metrics(test, oos, -np.inf)
    plain.pop("threshold")
    return {
        "score": score,
        "threshold": threshold,
        "validation": rejection_metrics(val, oos, threshold),
        "test": rejection_metrics(test, oos, threshold),
        "test_without_rejection": plain,
    }


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else 0.0
