import numpy as np
import pytest
from sampling import draw_counts
from scipy import stats

from fedtrust.server.selection import (
    ActivitySelection,
    Selection,
    UniformSelection,
    aggregation_weights,
    capped_inclusion,
    poisson_draw,
)

COUNTS = np.array([1, 2, 4, 8, 16, 32, 0, 64], dtype=float)


def _frequencies(selection, counts, k, draws=20_000, seed=0):
    hits = draw_counts(selection, counts, k, draws, seed)
    assert hits.sum() == k * draws  # k distinct devices every round
    return hits


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_single_draw_probability_is_proportional_to_count_power_beta(beta):
    hits = _frequencies(ActivitySelection(beta), COUNTS, k=1)
    expected = np.where(COUNTS > 0, COUNTS**beta, 0)
    expected = expected / expected.sum() * hits.sum()
    keep = expected > 0
    assert hits[~keep].sum() == 0  # a device with no data is never chosen
    assert stats.chisquare(hits[keep], expected[keep]).pvalue > 1e-3


def test_inclusion_probabilities_match_empirical_frequencies():
    k, draws = 3, 20_000
    selection = ActivitySelection(1.0)
    hits = _frequencies(selection, COUNTS, k, draws)
    _, inclusion = selection.select(COUNTS, k, np.random.default_rng(1))
    assert inclusion.sum() == pytest.approx(k, abs=0.02)
    assert np.allclose(hits / draws, inclusion, atol=0.02)


def test_beta_zero_and_uniform_are_uniform_over_devices_with_data():
    _, inclusion = UniformSelection().select(COUNTS, 2, np.random.default_rng(0))
    assert np.allclose(inclusion, np.where(COUNTS > 0, 2 / 7, 0))
    hits = _frequencies(ActivitySelection(0.0), COUNTS, k=2, draws=7000)
    assert hits[6] == 0
    assert stats.chisquare(np.delete(hits, 6)).pvalue > 1e-3


def test_fewer_devices_with_data_than_asked_selects_all_of_them(caplog):
    chosen, _ = UniformSelection().select(np.array([0, 3, 0, 1.0]), 3, np.random.default_rng(0))
    assert chosen.tolist() == [1, 3]
    assert "only 2 devices have data" in caplog.text
    with pytest.raises(RuntimeError, match="no device has any available example"):
        UniformSelection().select(np.zeros(4), 2, np.random.default_rng(0))


def test_negative_beta_is_rejected():
    with pytest.raises(ValueError, match="beta"):
        ActivitySelection(-1.0)


def test_horvitz_thompson_weights_are_unbiased():
    """E[sum_{i in S} w_i * delta_i] equals the full-participation update sum_i n_i/n * delta_i."""
    counts = np.array([3, 10, 40, 7, 90, 25], dtype=float)
    deltas = np.random.default_rng(0).normal(size=(len(counts), 4))
    target = (counts / counts.sum()) @ deltas
    selection, k, rng = ActivitySelection(1.0), 2, np.random.default_rng(0)
    inclusion = Selection.inclusion_probabilities(selection.weights(counts), k, draws=200_000)
    total = np.zeros(4)
    draws = 20_000
    for _ in range(draws):
        chosen = selection.draw(counts, k, rng)
        w = aggregation_weights("unbiased", counts, chosen, inclusion)
        total += w @ deltas[chosen]
    assert np.allclose(total / draws, target, atol=0.03)
    # The plain example-weighted average is biased towards heavy devices under this sampling.
    plain = np.zeros(4)
    for _ in range(draws // 4):
        chosen = selection.draw(counts, k, rng)
        w = aggregation_weights("examples", counts, chosen, inclusion)
        plain += (w / w.sum()) @ deltas[chosen]
    assert np.abs(plain / (draws // 4) - target).max() > 0.05


@pytest.mark.parametrize("q_max", [0.4, 0.6, 1.0])
def test_capped_inclusion_is_proportional_to_own_weight_under_the_cap(q_max):
    counts = np.array([1, 2, 4, 8, 16, 32, 0, 64, 500], dtype=float)
    p = capped_inclusion(ActivitySelection(1.0).weights(counts), 8.0, 0.3, q_max)
    assert p.max() <= q_max + 1e-12 and p[6] == 0  # capped; no data, never sampled
    assert p[3] == pytest.approx(min(0.3, q_max))  # the reference count gets the base rate
    below = (p > 0) & (p < q_max - 1e-12)
    assert np.allclose(p[below], 0.3 * counts[below] / 8.0)


def test_a_devices_inclusion_does_not_depend_on_the_other_devices():
    """Neighbouring populations (one device added) leave everyone else's probability alone."""
    weights = ActivitySelection(0.5).weights(np.array([3.0, 40.0, 7.0, 1.0]))
    huge = ActivitySelection(0.5).weights(np.array([1e6]))
    p = capped_inclusion(weights, 5.0, 0.2, 0.5)
    p_neighbour = capped_inclusion(np.concatenate([weights, huge]), 5.0, 0.2, 0.5)
    assert np.array_equal(p, p_neighbour[:-1]) and p_neighbour[-1] == 0.5


def test_poisson_draw_includes_each_device_with_its_probability():
    p = np.array([0.05, 0.3, 0.5, 0.0, 1.0])
    rng, draws = np.random.default_rng(0), 20_000
    hits = np.zeros(len(p))
    for _ in range(draws):
        hits[poisson_draw(p, rng)] += 1
    assert np.all(np.abs(hits / draws - p) <= 4 * np.sqrt(p * (1 - p) / draws) + 1e-12)
