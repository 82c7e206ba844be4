"""Cohort discovery: planted failing cohorts are found, small or noisy ones are not trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtrust.errors import FairnessError
from fedtrust.fairness.discovery import (
    attribute_cohorts,
    bootstrap_ci,
    bottom_share,
    cohort_of,
    embedding_clusters,
)

REGIONS = ["north", "south", "east"]


def population(seed: int = 0, n: int = 300, plant: str = "both") -> dict:
    """Devices with activity 1..12, a region and a language; the planted cohort's accuracy is
    ~0.4 (noise sd 0.05), everyone else's ~0.8. `plant`: "both" (activity <= 5 and region =
    north), "north" (region = north), "band" (3 <= activity <= 6) or "none"."""
    rng = np.random.default_rng(seed)
    activity = rng.integers(1, 13, n)
    region = rng.choice(REGIONS, n)
    bad = {
        "both": (activity <= 5) & (region == "north"),
        "north": region == "north",
        "band": (activity >= 3) & (activity <= 6),
        "none": np.zeros(n, dtype=bool),
    }[plant]
    accuracy = np.clip(np.where(bad, 0.4, 0.8) + rng.normal(0, 0.05, n), 0, 1)
    attributes = {
        "activity": activity,
        "region": region,
        "lang": rng.choice(["en", "de", "fr", "es"], n).astype(object),
        "entropy": rng.uniform(0, 2, n),
    }
    return {"accuracy": accuracy, "attributes": attributes, "examples": 10 * activity, "bad": bad}


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def find(pop: dict, **kwargs) -> list:
    return attribute_cohorts(pop["accuracy"], pop["attributes"], pop["examples"], **kwargs)


def test_bootstrap_ci_covers_the_mean_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 5000):
        values = (rng.random(n) < 0.7).astype(float)
        low, high = bootstrap_ci(values, resamples=500)
        assert low < values.mean() < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 5  # ~1/sqrt(100)
    values = rng.random(40)
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values, seed=2)


def test_bootstrap_ci_weights_units_and_drops_nan() -> None:
    values = np.r_[np.zeros(50), np.ones(50)]
    weights = np.r_[np.ones(50), 9 * np.ones(50)]  # weighted mean 0.9
    low, high = bootstrap_ci(values, weights)
    assert low < 0.9 < high and low > 0.8
    with_nan = np.r_[values, np.nan, np.nan]
    assert bootstrap_ci(with_nan, np.r_[weights, 1, 1]) == (low, high)
    assert bootstrap_ci(np.full(10, 0.25)) == (0.25, 0.25)
    assert all(np.isnan(bootstrap_ci(np.asarray([np.nan]))))
    with pytest.raises(FairnessError):
        bootstrap_ci(values, weights[:10])
    with pytest.raises(FairnessError):
        bootstrap_ci(values, level=1.5)


def test_a_two_attribute_cohort_is_found_at_depth_two() -> None:
    pop = population(plant="both")
    cohorts = find(pop)
    worst = cohorts[0]
    assert "activity" in worst.rule and "region" in worst.rule and " and " in worst.rule
    assert jaccard(worst.members, pop["bad"]) >= 0.8
    assert worst.gap == pytest.approx(0.4, abs=0.05)
    assert worst.ci[0] <= 0.4 <= worst.ci[1]  # the planted mean
    assert worst.gap_ci[0] > 0 and not worst.too_small
    assert worst.devices == worst.members.sum() == worst.scored
    assert worst.examples == pop["examples"][worst.members].sum()
    assert worst.example_share == pytest.approx(worst.examples / pop["examples"].sum())
    assert [c.gap for c in cohorts] == sorted((c.gap for c in cohorts), reverse=True)
    # one attribute at a time cannot isolate it
    shallow = find(pop, max_depth=1)[0]
    assert " and " not in shallow.rule and jaccard(shallow.members, pop["bad"]) < 0.6
    assert shallow.gap < worst.gap - 0.1


def test_a_single_attribute_cohort_is_found_at_depth_one_and_not_split_further() -> None:
    pop = population(plant="north")
    for depth in (1, 2):
        worst = find(pop, max_depth=depth)[0]
        assert worst.rule == "region = north"
        assert np.array_equal(worst.members, pop["bad"])
        assert worst.gap == pytest.approx(0.4, abs=0.05)


def test_a_band_of_one_numeric_attribute_reads_as_a_range() -> None:
    pop = population(plant="band")
    worst = find(pop)[0]
    assert worst.rule == "2 < activity <= 6"
    assert np.array_equal(worst.members, pop["bad"])


def test_near_duplicates_are_skipped_and_a_second_cohort_is_kept() -> None:
    pop = population(plant="both")
    cohorts = find(pop, top=3)
    # subsets and dilutions of the planted cohort are not returned as further cohorts
    assert len(cohorts) == 1
    # a second, distinct failing group: every "de" device outside the first at ~0.6
    pop["accuracy"] = np.where(
        (pop["attributes"]["lang"] == "de") & ~pop["bad"], pop["accuracy"] - 0.2, pop["accuracy"]
    )
    first, second = find(pop, top=3)
    assert jaccard(first.members, pop["bad"]) >= 0.8 and second.rule == "lang = de"
    share = bottom_share([first, second])
    union = first.members | second.members
    assert share["devices"] == union.sum() and share["device_share"] == union.mean()
    assert share["example_share"] == pytest.approx(
        pop["examples"][union].sum() / pop["examples"].sum()
    )
    assert bottom_share([])["devices"] == 0


def test_min_devices_keeps_a_tiny_cohort_out() -> None:
    rng = np.random.default_rng(1)
    accuracy = np.clip(0.8 + rng.normal(0, 0.05, 200), 0, 1)
    accuracy[:3] = 0.0  # three devices the model fails entirely
    tiny = np.arange(200) < 3
    attributes, examples = {"x": np.arange(200)}, np.ones(200)
    loose = attribute_cohorts(accuracy, attributes, examples, min_devices=3)
    assert np.array_equal(loose[0].members, tiny) and loose[0].rule == "x <= 2"
    strict = attribute_cohorts(accuracy, attributes, examples, min_devices=10)
    assert strict and all(c.scored >= 10 for c in strict)
    assert not any(np.array_equal(c.members, tiny) for c in strict)
    assert cohort_of("x <= 2", tiny, accuracy, examples, min_devices=10).too_small
    assert not cohort_of("x <= 2", tiny, accuracy, examples, min_devices=3).too_small


def test_unscored_devices_are_ignored_for_scoring_but_counted_in_shares() -> None:
    pop = population(plant="north", seed=3)
    rng = np.random.default_rng(3)
    region = pop["attributes"]["region"]
    accuracy = pop["accuracy"].copy()
    accuracy[region == "east"] = np.nan  # as 0 they would be the worst cohort
    accuracy[rng.random(len(accuracy)) < 0.2] = np.nan
    cohorts = attribute_cohorts(accuracy, pop["attributes"], pop["examples"])
    worst = cohorts[0]
    assert worst.rule == "region = north" and all("east" not in c.rule for c in cohorts)
    assert worst.devices == (region == "north").sum() > worst.scored
    assert worst.device_share == pytest.approx((region == "north").mean())
    assert worst.accuracy == pytest.approx(np.nanmean(accuracy[region == "north"]))
    assert worst.rest_accuracy == pytest.approx(np.nanmean(accuracy[region != "north"]))


def test_no_signal_gives_small_gaps_and_no_split_gives_nothing() -> None:
    for seed in range(3):
        cohorts = find(population(seed=seed, plant="none"))
        assert cohorts and max(c.gap for c in cohorts) < 0.05
        assert all(" and " not in c.rule for c in cohorts)  # noise is not refined
    few = population(n=15)
    assert find(few, min_devices=10) == []
    assert attribute_cohorts(np.full(40, np.nan), {"x": np.arange(40)}, np.ones(40)) == []
    with pytest.raises(FairnessError, match="attribute 'x'"):
        attribute_cohorts(np.ones(5), {"x": np.arange(4)}, np.ones(5))


def test_cohort_dict_is_json_ready() -> None:
    worst = find(population())[0]
    data = json.loads(json.dumps(worst.to_dict()))
    assert data["members"] == worst.devices and data["rule"] == worst.rule
    assert data["ci"] == list(worst.ci) and "device_examples" not in data


def blobs(per_blob: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Three tight, far-apart Gaussian blobs in 8 dimensions; the model is always wrong on
    blob 1 and always right elsewhere."""
    rng = np.random.default_rng(seed)
    centres = 10 * np.eye(8)[:3] + 1
    x = np.concatenate([c + 0.1 * rng.normal(size=(per_blob, 8)) for c in centres])
    blob = np.repeat(np.arange(3), per_blob)
    texts = [f"blob{b} text {i}" for i, b in enumerate(blob)]
    return x, (blob != 1).astype(float), texts


def test_embedding_clusters_put_the_always_wrong_blob_first() -> None:
    x, correct, texts = blobs()
    clusters = embedding_clusters(x, correct, texts, clusters=3, resamples=200)
    worst = clusters[0]
    assert worst.accuracy == 0.0 and worst.ci == (0.0, 0.0) and worst.size == 40
    assert len(worst.examples) == 3 and all(t.startswith("blob1 ") for t in worst.examples)
    assert [c.accuracy for c in clusters[1:]] == [1.0, 1.0] and not worst.too_small
    assert json.loads(json.dumps(worst.to_dict()))["examples"] == worst.examples
    # blob 0 half right: the order is by accuracy, whatever k-means numbers the clusters
    correct[:40:2] = 0.0
    ordered = embedding_clusters(x, correct, texts, clusters=3, seed=1, resamples=50)
    assert [c.accuracy for c in ordered] == [0.0, 0.5, 1.0]


def test_embedding_clusters_group_by_direction_not_length() -> None:
    """Embeddings are L2-normalised: long and short vectors of one direction cluster together."""
    rng = np.random.default_rng(2)
    lengths = np.r_[np.full(20, 0.5), np.full(20, 50.0)]
    a = np.outer(lengths, [1.0, 0.0, 0.0]) + 0.01 * rng.normal(size=(40, 3))
    b = np.outer(lengths, [0.0, 1.0, 0.0]) + 0.01 * rng.normal(size=(40, 3))
    texts = [f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)]
    correct = np.r_[np.zeros(40), np.ones(40)]
    clusters = embedding_clusters(np.r_[a, b], correct, texts, clusters=2, resamples=50)
    assert [(c.size, c.accuracy) for c in clusters] == [(40, 0.0), (40, 1.0)]


def test_embedding_clusters_are_clamped_and_flagged() -> None:
    x, correct, texts = blobs(per_blob=3)
    clusters = embedding_clusters(x[:5], correct[:5], texts[:5], clusters=50, resamples=50)
    assert 1 <= len(clusters) <= 5 and sum(c.size for c in clusters) == 5
    assert all(c.too_small for c in clusters)  # below min_size=20
    assert embedding_clusters(x[:1], correct[:1], texts[:1]) == []
    same = embedding_clusters(np.ones((6, 4)), np.ones(6), ["t"] * 6, clusters=3)
    assert len(same) == 1 and same[0].size == 6  # one distinct row: one cluster
    with pytest.raises(FairnessError):
        embedding_clusters(x, correct, texts[:-1])


def test_a_well_served_minoritys_complement_is_not_a_cohort() -> None:
    # 10 % of the devices are served far better than everyone else: with max_share = 0.5 the
    # 90 % "rest" is not reported as a failed cohort
    rng = np.random.default_rng(3)
    n = 300
    length = rng.uniform(10, 60, n)
    accuracy = np.where(length <= np.quantile(length, 0.1), 0.9, 0.5) + rng.normal(0, 0.02, n)
    examples = np.full(n, 10.0)
    unrestricted = attribute_cohorts(accuracy, {"length": length}, examples, min_devices=10)
    assert unrestricted and unrestricted[0].device_share > 0.85
    limited = attribute_cohorts(
        accuracy, {"length": length}, examples, min_devices=10, max_share=0.5
    )
    assert all(c.device_share <= 0.5 for c in limited)
