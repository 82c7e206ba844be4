"""Every run's cohort report names its worst discovered cohort (attribute splits, clusters)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtrust.fairness.cohorts import Discovery, cohort_report, device_attributes
from fedtrust.simulations.cohort_summary import summary_excerpt
from fedtrust.simulations.fairness_report import (
    cohort_markdown,
    short_rule,
    write_cohort_report,
)


@dataclass
class FailingLightTask:
    """An LM-like task whose model fails the test rows of light devices in region "north",
    and whose held-out embeddings put those rows in their own direction."""

    kind: str
    train: list[dict]
    test: list[dict]
    primary_metric: str = "accuracy"

    def example_hits(self, model, rows, batch_size=256):
        hits = np.asarray([float(r["ok"]) for r in rows])
        return hits, np.ones_like(hits)

    def embed(self, model, rows, batch_size=256):
        rng = np.random.default_rng(0)
        base = np.asarray([[1.0, 0, 0] if r["ok"] else [0, 0, 1.0] for r in rows])
        return base + rng.normal(0, 0.05, base.shape)

    def decode(self, row) -> str:
        return row["text"]


@dataclass
class Population:
    parts: list[np.ndarray]
    names: list[str]

    @property
    def size(self) -> int:
        return len(self.parts)

    def sizes(self) -> np.ndarray:
        return np.asarray([len(p) for p in self.parts])


def _population(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 60, size=n)
    region = np.where(rng.random(n) < 0.5, "north", "south")
    failed = (sizes <= 15) & (region == "north")
    train, parts, test = [], [], []
    for d in range(n):
        start = len(train)
        train += [{"input_ids": [1] * 8, "labels": 0, "cohort": region[d]}] * int(sizes[d])
        parts.append(np.arange(start, start + sizes[d]))
        for j in range(4):
            ok = int(rng.random() < (0.2 if failed[d] else 0.9))
            test.append({"device": f"d{d}", "ok": ok, "text": f"line {d}.{j}"})
    task = FailingLightTask("lm", train=train, test=test)
    return task, Population(parts, [f"d{d}" for d in range(n)]), failed


def test_the_report_names_the_planted_failed_cohort(tmp_path):
    task, population, failed = _population()
    metrics = [{"round": 0}] + [{"round": r, "devices": list(range(r, 120, 7))} for r in (1, 2)]
    discovery = Discovery(min_devices=8, clusters=3, embed_examples=300, resamples=300)
    report = cohort_report(task, None, population, metrics, 4, discovery)
    found = report["discovered"]["cohorts"]
    assert found, "the planted cohort was not found"
    worst = found[0]
    assert "activity" in worst["rule"] and "cohort = north" in worst["rule"]
    assert worst["gap"] > 0.4 and not worst["too_small"]
    assert abs(worst["devices"] - failed.sum()) <= 0.25 * failed.sum()
    assert worst["ci"][0] < worst["accuracy"] < worst["ci"][1]
    clusters = report["clusters"]
    assert clusters[0]["accuracy"] < 0.05 and clusters[-1]["accuracy"] > 0.95
    assert all(t.startswith("line ") for t in clusters[0]["examples"])
    text = cohort_markdown(report)
    assert f"**Worst discovered cohort: {worst['rule']}**" in text
    assert "### embedding clusters" in text
    excerpt = summary_excerpt(report)
    assert excerpt["discovered"]["rule"] == worst["rule"]
    assert "examples" in excerpt["discovered"]  # the count stays; cluster texts are dropped
    assert "examples" not in excerpt["worst_cluster"]
    write_cohort_report(report, tmp_path)
    assert "Worst discovered cohort" in (tmp_path / "cohorts.md").read_text()


def test_without_an_admissible_split_the_report_says_so():
    task, population, _ = _population(n=12)
    report = cohort_report(task, None, population, [{"round": 0}], 2, Discovery(min_devices=10))
    assert report["discovered"]["cohorts"] == []
    assert "**Worst discovered cohort: none**" in cohort_markdown(report)
    assert summary_excerpt(report)["discovered"] is None


def test_intent_devices_are_described_by_their_label_mix():
    @dataclass
    class Intent:
        kind: str
        train: list[dict]
        labels: tuple = ("alarm", "weather")

    train = [{"input_ids": [1, 2], "labels": 0}] * 3 + [{"input_ids": [1, 2, 3, 4], "labels": 1}]
    attributes = device_attributes(Intent("intent", train), [np.asarray([0, 1, 2]),
                                                             np.asarray([0, 3])])  # fmt: skip
    assert list(attributes["top intent"]) == ["alarm", "alarm"]
    np.testing.assert_allclose(attributes["top intent share"], [1.0, 0.5])
    np.testing.assert_allclose(attributes["label entropy"], [0.0, 1.0])
    np.testing.assert_allclose(attributes["mean length"], [2.0, 3.0])
    np.testing.assert_allclose(attributes["activity"], [3, 2])


def test_under_dp_discovery_splits_on_public_activity_only():
    task, population, _ = _population()
    metrics = [{"round": 0}]
    private = Discovery(min_devices=8, clusters=0, resamples=200, public_only=True)
    report = cohort_report(task, None, population, metrics, 4, private)
    assert report["discovered"]["attributes"] == ["activity"]
    assert all("north" not in c["rule"] for c in report["discovered"]["cohorts"])
    assert any("not a release covered" in n for n in report["discovered"]["notes"])
    assert "Note: DP run" in cohort_markdown(report)


def test_long_value_sets_are_cut_in_tables_but_kept_in_the_json():
    rule = "top intent share > 0.14 and top intent in {a, b, c, d, e, f}"
    assert short_rule(rule) == "top intent share > 0.14 and top intent in {a, b, c, d, … +2 more}"
    assert short_rule("region in {north, south}") == "region in {north, south}"
    assert short_rule("region = a|b") == "region = a/b"
