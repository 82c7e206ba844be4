"""Per-cohort accuracy: device scoring, activity quantiles, gaps and participation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from fedtrust.errors import FairnessError
from fedtrust.fairness.cohorts import activity_cohorts, cohort_report, device_accuracy
from fedtrust.simulations.fairness_report import (
    cohort_figure,
    cohort_markdown,
    write_cohort_report,
)


@dataclass
class FakeTask:
    """A task whose model is right exactly on the test rows flagged `ok`."""

    kind: str
    train: list[dict]
    test: list[dict]

    def example_hits(self, model, rows, batch_size=256):
        hits = np.asarray([float(r["ok"]) for r in rows])
        return hits, np.ones_like(hits)


@dataclass
class FakePopulation:
    parts: list[np.ndarray]
    names: list[str]
    metrics: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.parts)

    def sizes(self) -> np.ndarray:
        return np.asarray([len(p) for p in self.parts])


def test_device_test_rows_score_each_device_on_its_own_rows() -> None:
    test = [
        {"device": "a", "ok": 1},
        {"device": "a", "ok": 0},
        {"device": "b", "ok": 1},
        {"device": "zz", "ok": 0},  # not a device of the population: ignored
    ]
    task = FakeTask("lm", train=[], test=test)
    acc, source = device_accuracy(task, None, [np.arange(1)] * 3, ["a", "b", "c"])
    assert source == "device test rows"
    assert acc[0] == 0.5 and acc[1] == 1.0 and np.isnan(acc[2])


def test_label_mix_weights_per_intent_accuracy_by_the_device_labels() -> None:
    # intent 0 always right, intent 1 always wrong
    test = [{"labels": 0, "ok": 1}, {"labels": 0, "ok": 1}, {"labels": 1, "ok": 0}]
    train = [{"labels": 0}, {"labels": 0}, {"labels": 0}, {"labels": 1}]
    task = FakeTask("intent", train=train, test=test)
    parts = [np.asarray([0, 1]), np.asarray([2, 3]), np.asarray([3])]
    acc, source = device_accuracy(task, None, parts, ["x", "y", "z"])
    assert source == "label mix"
    np.testing.assert_allclose(acc, [1.0, 0.5, 0.0])


def test_lm_without_device_ids_is_a_clear_error() -> None:
    task = FakeTask("lm", train=[], test=[{"ok": 1}])
    with pytest.raises(FairnessError, match="test rows with device ids"):
        device_accuracy(task, None, [np.arange(1)], ["a"])


def test_activity_quantiles_put_light_and_heavy_devices_apart() -> None:
    sizes = np.asarray([1, 2, 3, 4, 10, 20, 30, 40])
    which, names = activity_cohorts(sizes, quantiles=4)
    assert list(which) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert names[0] == "Q1: 1–2 examples" and names[3] == "Q4: 30–40 examples"
    same, names = activity_cohorts(np.full(5, 7), quantiles=4)  # IID: one cohort
    assert set(same) == {0} and len(names) == 1


def test_report_finds_the_under_served_light_cohort(tmp_path) -> None:
    # 8 devices; the light half is wrong on its test rows and never selected
    names = [f"d{i}" for i in range(8)]
    parts = [np.arange(n) for n in (1, 1, 2, 2, 10, 10, 20, 20)]
    test = [{"device": n, "ok": int(i >= 4), "cohort": ""} for i, n in enumerate(names)]
    train = [{"labels": 0, "cohort": "north" if i < 5 else "south"} for i in range(20)]
    task = FakeTask("lm", train=train, test=test)
    metrics = [{"round": 0}] + [{"round": r, "devices": [4, 5, 6, 7]} for r in (1, 2)]
    report = cohort_report(task, None, FakePopulation(parts, names), metrics, quantiles=2)
    activity = report["by"]["activity"]
    light, heavy = activity["cohorts"]
    assert light["accuracy"] == 0.0 and heavy["accuracy"] == 1.0
    assert activity["gap"] == 1.0 and activity["worst"].startswith("Q1")
    assert light["never_selected"] == 1.0 and heavy["selected_per_device"] == 2.0
    assert heavy["selection_rate"] == 1.0
    assert report["worst_gap"] == 1.0
    # the device attribute: device parts index train rows; rows 0-4 are "north"
    attribute = report["by"]["attribute"]
    assert [c["cohort"] for c in attribute["cohorts"]] == ["north", "south"]
    text = cohort_markdown(report)
    assert "### by activity" in text and "| north |" in text
    # the figure: one panel per grouping, a bar per scored cohort at its accuracy
    activity_ax, attribute_ax = cohort_figure(report).axes
    assert [b.get_height() for b in activity_ax.patches] == [0.0, 1.0]
    assert [t.get_text() for t in activity_ax.get_xticklabels()] == ["Q1", "Q2"]
    assert activity_ax.get_title() == "by activity (gap 1.000)"
    assert [t.get_text() for t in activity_ax.texts] == ["sel 0.0", "sel 2.0"]
    assert [t.get_text() for t in attribute_ax.get_xticklabels()] == ["north", "south"]
    write_cohort_report(report, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"cohorts.json", "cohorts.md", "cohorts.png"}
