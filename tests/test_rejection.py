"""Out-of-scope rejection: scores, metrics, threshold tuning, and the end-to-end report."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from fedtrust.errors import DataError
from fedtrust.tasks.intent import IntentTask, build_intent_task
from fedtrust.tasks.rejection import (
    Scores,
    oos_rejection,
    rejection_metrics,
    score_rows,
    tune_threshold,
)
from fedtrust.tasks.spec import TaskSpec
from fedtrust.tasks.training import make_optimizer, train_steps

OOS = 3


def _scores(predicted, best, confidence, gold) -> Scores:
    return Scores(*(np.asarray(x) for x in (predicted, best, confidence, gold)))


def _balanced(m: dict) -> float:
    return (m["in_scope_accuracy"] + m["oos_recall"]) / 2


def test_rejection_metrics_by_hand():
    scores = _scores(
        predicted=[0, 1, 3, 3, 0, 2],
        best=[0, 1, 2, 1, 0, 2],
        confidence=[0.9, 0.4, 0.8, 0.5, 0.3, 0.7],
        gold=[0, 1, 2, 3, 3, 0],
    )
    # 0.45 rejects rows 1 and 4; rows 2 and 3 are out-of-scope by argmax
    assert rejection_metrics(scores, OOS, 0.45) == pytest.approx(
        {
            "in_scope_accuracy": 1 / 4,  # row 0 only (row 1 rejected, row 2 oos, row 5 wrong)
            "oos_recall": 2 / 2,
            "accuracy": 3 / 6,
            "rejected_share": 4 / 6,
            "threshold": 0.45,
        }
    )
    plain = rejection_metrics(scores, OOS, -np.inf)
    assert (plain["in_scope_accuracy"], plain["oos_recall"]) == (2 / 4, 1 / 2)
    assert (plain["accuracy"], plain["rejected_share"]) == (3 / 6, 2 / 6)


def test_tune_threshold_separates_planted_low_confidence_oos_rows():
    g = np.random.default_rng(0)
    gold = np.array([0, 1, 2] * 30 + [OOS] * 20)
    conf = np.concatenate([g.uniform(0.6, 1.0, 90), g.uniform(0.05, 0.5, 20)])
    scores = _scores(np.where(gold == OOS, 1, gold), np.where(gold == OOS, 1, gold), conf, gold)
    threshold = tune_threshold(scores, OOS)
    assert conf[gold == OOS].max() < threshold <= conf[gold != OOS].min()
    metrics = rejection_metrics(scores, OOS, threshold)
    assert _balanced(metrics) == 1.0 and metrics["rejected_share"] == pytest.approx(20 / 110)
    assert _balanced(rejection_metrics(scores, OOS, -np.inf)) == 0.5


def _brute_force(scores: Scores, oos: int = OOS) -> float:
    """The best balanced score over every threshold that rejects a different set of rows."""
    return max(_balanced(rejection_metrics(scores, oos, t)) for t in np.unique(scores.confidence))


@pytest.mark.parametrize("seed", range(5))
def test_tune_threshold_matches_a_brute_force_search_on_mixed_scores(seed):
    g = np.random.default_rng(seed)
    n = 200
    gold = g.integers(0, 4, n)
    predicted = np.where(g.random(n) < 0.7, gold, g.integers(0, 4, n))
    best = np.where(predicted == OOS, g.integers(0, 3, n), predicted)
    # overlapping confidences, out-of-scope rows lower on average; ties included
    conf = np.round(g.normal(np.where(gold == OOS, 0.4, 0.6), 0.15), 2)
    scores = _scores(predicted, best, conf, gold)
    threshold = tune_threshold(scores, OOS)
    tuned = _balanced(rejection_metrics(scores, OOS, threshold))
    assert tuned == pytest.approx(_brute_force(scores))
    assert tuned > _balanced(rejection_metrics(scores, OOS, -np.inf))


def test_tune_threshold_keeps_everything_when_rejection_cannot_help():
    scores = _scores([0, 1, 3], [0, 1, 0], [0.2, 0.9, 0.5], [0, 1, 3])
    assert tune_threshold(scores, OOS) == 0.2  # the lowest confidence: nothing rejected
    assert rejection_metrics(scores, OOS, 0.2)["rejected_share"] == pytest.approx(1 / 3)


WORDS = {
    "alarm": "wake alarm morning clock",
    "music": "song play album artist",
    "weather": "rain sun cloud forecast",
    "oos": "banana tax volcano poem",
}


def _split(n: int, offset: int) -> Dataset:
    texts, labels = [], []
    for i in range(offset, offset + n):
        label = list(WORDS)[i % 4]
        vocab = WORDS[label].split()
        texts.append(f"please {vocab[i % 4]} {vocab[(i // 4) % 4]}")
        labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels})


@pytest.fixture(scope="module")
def oos_task(tiny_bert) -> IntentTask:
    raw = DatasetDict({"train": _split(80, 0), "validation": _split(40, 80), "test": _split(40, 7)})
    return build_intent_task(raw, TaskSpec(dataset="toy", model=str(tiny_bert), freeze_layers=0))


@pytest.fixture(scope="module")
def trained(oos_task):
    model = oos_task.build_model(seed=0)
    optimizer = make_optimizer(model, 3e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(3):
        train_steps(optimizer, oos_task.batches(oos_task.train, 16, rng), lambda b: model(**b).loss)
    return model


@pytest.mark.parametrize("score", ["msp", "energy"])
def test_score_rows_reads_the_logits_in_row_order(oos_task, trained, score):
    rows = oos_task.test[:9]
    scores = score_rows(oos_task, trained, rows, score=score, batch_size=4)
    oos = oos_task.labels.index("oos")
    trained.eval()
    with torch.no_grad():
        for i, row in enumerate(rows):
            logits = trained(**oos_task.collate([row])).logits[0].double()
            in_scope = logits.clone()
            in_scope[oos] = -torch.inf
            expected = logits.softmax(-1)[in_scope.isfinite()].max()
            if score == "energy":
                expected = in_scope.logsumexp(-1)
            assert scores.predicted[i] == int(logits.argmax())
            assert scores.best_in_scope[i] == int(in_scope.argmax()) != oos
            assert scores.confidence[i] == pytest.approx(float(expected), rel=1e-6)
            assert scores.gold[i] == row["labels"]


@pytest.mark.parametrize("score", ["msp", "energy"])
def test_oos_rejection_end_to_end(oos_task, trained, score):
    report = oos_rejection(oos_task, trained, score=score)
    assert set(report) == {"score", "threshold", "validation", "test", "test_without_rejection"}
    assert report["score"] == score and np.isfinite(report["threshold"])
    keys = {"in_scope_accuracy", "oos_recall", "accuracy", "rejected_share"}
    assert set(report["validation"]) == set(report["test"]) == keys | {"threshold"}
    assert set(report["test_without_rejection"]) == keys
    plain = oos_task.evaluate(trained, oos_task.test)  # the task's own argmax metrics
    for key in ("in_scope_accuracy", "oos_recall", "accuracy"):
        assert report["test_without_rejection"][key] == pytest.approx(plain[key])
    assert report["test"]["oos_recall"] >= report["test_without_rejection"]["oos_recall"]
    val = score_rows(oos_task, trained, oos_task.validation, score=score)
    oos = oos_task.labels.index("oos")
    assert _balanced(report["validation"]) == pytest.approx(_brute_force(val, oos))


def test_oos_rejection_needs_an_oos_label_and_validation_rows(oos_task, trained):
    no_oos = replace(oos_task, labels=("alarm", "music", "pin", "weather"))
    with pytest.raises(DataError, match="needs an 'oos' label"):
        oos_rejection(no_oos, trained)
    no_validation = replace(oos_task, validation=[])
    with pytest.raises(DataError, match="needs validation rows"):
        oos_rejection(no_validation, trained)
