"""Fair activity selection: a uniform floor under activity-based sampling, and annealed beta.

The issue: activity selection (P ~ count ** beta) almost never selects the lightest devices.
With a floor every device with data keeps at least about `floor` times its uniform inclusion
probability, and under user-level DP the floor lifts light devices without touching the cap.
"""

from __future__ import annotations

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
)
from fedtrust.server.user_dp import DPFedAvg

# 50 light devices with one example each, 5 heavy ones with 500: the heavy quarter-and-more of
# the data sits on 9% of the devices.
LIGHT, HEAVY = 50, 5
SKEWED = np.array([1.0] * LIGHT + [500.0] * HEAVY)
N, K, DRAWS = LIGHT + HEAVY, 5, 20_000


def _frequencies(selection: Selection, counts: np.ndarray, k: int, draws: int = DRAWS, seed=0):
    return draw_counts(selection, counts, k, draws, seed) / draws


def test_without_a_floor_light_devices_are_far_below_uniform():
    freq = _frequencies(ActivitySelection(1.0), SKEWED, K)
    assert freq[:LIGHT].max() < 0.2 * K / N  # uniform would give each K/N ~ 0.09
    assert freq[LIGHT:].min() > 0.9


@pytest.mark.parametrize("floor", [0.25, 0.5])
def test_a_floor_gives_every_light_device_at_least_floor_times_uniform(floor):
    selection = ActivitySelection(1.0, floor=floor)
    freq = _frequencies(selection, SKEWED, K)
    # the documented guarantee: >= 1 - (1 - floor/N)**k ~ floor * k/N, for every device
    bound = 1 - (1 - floor / N) ** K
    assert bound == pytest.approx(floor * K / N, rel=0.05)
    assert freq[:LIGHT].min() >= 0.9 * bound
    assert freq[:LIGHT].min() >= 0.9 * floor * K / N
    # heavy devices are still favoured: this is a floor, not uniform selection
    assert freq[LIGHT:].min() > 3 * K / N


def test_monte_carlo_inclusion_of_the_mixture_matches_empirical_frequencies():
    selection = ActivitySelection(1.0, floor=0.5)
    freq = _frequencies(selection, SKEWED, K)
    chosen, inclusion = selection.select(SKEWED, K, np.random.default_rng(1))
    assert len(chosen) == K and inclusion.sum() == pytest.approx(K, abs=1e-9)
    # 4000 Monte-Carlo draws against 20 000 empirical ones: 4 standard errors of the difference
    tolerance = 4 * np.sqrt(inclusion * (1 - inclusion) * (1 / 4000 + 1 / DRAWS)) + 1e-3
    assert np.all(np.abs(freq - inclusion) <= tolerance)


def test_floor_one_is_uniform_and_devices_without_data_are_never_drawn():
    counts = np.concatenate([SKEWED, [0.0, 0.0]])
    eligible = counts > 0
    _, inclusion = ActivitySelection(1.0, floor=1.0).select(counts, K, np.random.default_rng(0))
    _, uniform = UniformSelection().select(counts, K, np.random.default_rng(0))
    assert np.array_equal(inclusion, uniform)
    assert np.allclose(inclusion, np.where(eligible, K / N, 0.0))
    freq = _frequencies(ActivitySelection(1.0, floor=1.0), counts, K, draws=6000)
    assert freq[~eligible].sum() == 0
    assert stats.chisquare(freq[eligible] * 6000).pvalue > 1e-3
    freq = _frequencies(ActivitySelection(1.0, floor=0.5), counts, K, draws=2000)
    assert freq[~eligible].sum() == 0


def test_sampling_weights_are_the_documented_mixture():
    counts = np.array([1.0, 4.0, 0.0, 15.0])
    a = counts**2
    expected = 0.7 * a / a.sum() + 0.3 * (counts > 0) / 3
    expected[2] = 0.0
    assert np.allclose(ActivitySelection(2.0, floor=0.3).sampling_weights(counts), expected)
    # the devices' own weights (used by user-level DP) are not mixed
    assert np.array_equal(ActivitySelection(2.0, floor=0.3).weights(counts), a)
    assert UniformSelection().floor == 0.0 and ActivitySelection().floor == 0.0


def test_inverse_probability_weights_stay_unbiased_with_a_floor():
    """E[sum_{i in S} w_i * delta_i] equals the full-participation update under the mixture."""
    counts = np.array([1, 1, 2, 3, 10, 40, 90, 300], dtype=float)
    deltas = np.random.default_rng(0).normal(size=(len(counts), 4))
    target = (counts / counts.sum()) @ deltas
    selection, k, rng = ActivitySelection(1.0, floor=0.5), 3, np.random.default_rng(0)
    inclusion = Selection.inclusion_probabilities(
        selection.sampling_weights(counts), k, draws=200_000
    )
    assert inclusion[:2].min() >= 1 - (1 - 0.5 / len(counts)) ** k
    total, draws = np.zeros(4), 20_000
    for _ in range(draws):
        chosen = selection.draw(counts, k, rng)
        total += aggregation_weights("unbiased", counts, chosen, inclusion) @ deltas[chosen]
    assert np.allclose(total / draws, target, atol=0.05)


# annealing -----------------------------------------------------------------------------------


def test_at_round_interpolates_beta_linearly_and_keeps_the_floor():
    selection = ActivitySelection(2.0, floor=0.3, beta_end=0.5)
    first, middle, last = (selection.at_round(r, 11) for r in (1, 6, 11))
    assert first.beta == pytest.approx(2.0) and last.beta == pytest.approx(0.5)
    assert middle.beta == pytest.approx(1.25)
    assert all(s.floor == 0.3 for s in (first, middle, last))
    betas = [selection.at_round(r, 11).beta for r in range(1, 12)]
    assert np.allclose(np.diff(betas), -0.15)
    # the annealed selection samples as a fixed-beta one with that beta
    counts = np.array([1.0, 5.0, 0.0, 50.0])
    assert np.array_equal(
        middle.sampling_weights(counts),
        ActivitySelection(1.25, floor=0.3).sampling_weights(counts),
    )
    assert selection.at_round(1, 1).beta == 2.0  # a one-round run uses beta
    assert selection.at_round(20, 11).beta == pytest.approx(0.5)  # past the end: beta_end


def test_at_round_without_annealing_is_the_same_selection():
    fixed = ActivitySelection(0.5, floor=0.2)
    assert fixed.at_round(3, 10) is fixed
    uniform = UniformSelection()
    this_round = uniform.at_round(4, 10)
    assert isinstance(this_round, UniformSelection) and this_round.floor == 0.0
    _, expected = uniform.select(SKEWED, K, np.random.default_rng(0))
    _, got = this_round.select(SKEWED, K, np.random.default_rng(0))
    assert np.array_equal(got, expected)


# user-level DP -------------------------------------------------------------------------------


def test_capped_inclusion_floor_lifts_light_devices_and_never_passes_the_cap():
    weights = ActivitySelection(1.0).weights(np.array([1, 2, 8, 40, 500, 0], dtype=float))
    base, q_max = 0.1, 0.25
    plain = capped_inclusion(weights, 8.0, base, q_max)
    floored = capped_inclusion(weights, 8.0, base, q_max, floor=0.5)
    assert np.allclose(plain, [0.1 / 8, 0.2 / 8, 0.1, 0.25, 0.25, 0.0])
    assert np.allclose(floored, [0.05, 0.05, 0.1, 0.25, 0.25, 0.0])
    assert np.all(floored >= plain) and floored.max() <= q_max and floored[-1] == 0
    full = capped_inclusion(weights, 8.0, base, q_max, floor=1.0)
    assert np.allclose(full[:-1], [0.1, 0.1, 0.1, 0.25, 0.25]) and full[-1] == 0
    # the floor never lifts above the cap even when base_rate itself exceeds it
    assert capped_inclusion(weights, 8.0, 0.4, 0.3, floor=1.0).max() == pytest.approx(0.3)


def test_with_a_floor_a_devices_inclusion_does_not_depend_on_the_other_devices():
    """Add/remove one device: everyone else's probability is unchanged, the new one capped."""
    weights = ActivitySelection(0.5).weights(np.array([3.0, 40.0, 7.0, 1.0, 0.0]))
    for extra in (1e6, 1.0, 0.0):
        more = ActivitySelection(0.5).weights(np.array([extra]))
        p = capped_inclusion(weights, 5.0, 0.2, 0.5, floor=0.6)
        p_added = capped_inclusion(np.concatenate([weights, more]), 5.0, 0.2, 0.5, floor=0.6)
        p_removed = capped_inclusion(weights[1:], 5.0, 0.2, 0.5, floor=0.6)
        assert np.array_equal(p, p_added[:-1]) and np.array_equal(p[1:], p_removed)
        assert 0 <= p_added[-1] <= 0.5


def _capped_mech() -> DPFedAvg:
    return DPFedAvg(
        noise_multiplier=1.0,
        clip=0.5,
        devices_per_round=K,
        num_devices=N,
        max_inclusion=2 * K / N,
        capped=True,
        reference=100.0,
        delta=1e-5,
        accountant="rdp",
        seed=0,
        reproducible=True,
    )


def test_user_dp_reads_the_floor_from_the_selection_and_keeps_its_sample_rate():
    mech = _capped_mech()
    plain = mech.inclusion(ActivitySelection(1.0), SKEWED)
    fair = mech.inclusion(ActivitySelection(1.0, floor=0.5), SKEWED)
    assert np.allclose(plain[:LIGHT], K / N / 100)
    assert np.allclose(fair[:LIGHT], 0.5 * K / N)  # lifted to floor * k/N
    assert np.allclose(fair[LIGHT:], 2 * K / N) and np.array_equal(plain[LIGHT:], fair[LIGHT:])
    assert fair.max() <= mech.sample_rate == 2 * K / N
    # the accountant's rate, hence epsilon, is the same with and without the floor
    assert mech.epsilon(10)["sample_rate"] == 2 * K / N
    # Poisson sampling includes each light device at its lifted rate
    hits = np.zeros(N)
    for r in range(1, 4001):
        hits[mech.sample(ActivitySelection(1.0, floor=0.5), SKEWED, r)] += 1
    light_rate = hits[:LIGHT].sum() / (4000 * LIGHT)
    assert light_rate == pytest.approx(0.5 * K / N, abs=4 * np.sqrt(0.05 / (4000 * LIGHT)))


def test_user_dp_with_annealing_changes_with_the_round_and_stays_capped():
    mech = _capped_mech()
    selection = ActivitySelection(1.0, floor=0.2, beta_end=0.0)
    counts = np.array([1.0, 10.0, 100.0, 1000.0, 0.0])
    first = mech.inclusion(selection.at_round(1, 5), counts)
    last = mech.inclusion(selection.at_round(5, 5), counts)
    assert not np.array_equal(first, last)
    assert np.allclose(last[:4], K / N) and last[4] == 0  # beta 0: every device at k/N
    assert max(first.max(), last.max()) <= mech.sample_rate


# validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("floor", [-0.1, 1.5, float("nan")])
def test_a_floor_outside_zero_one_is_rejected(floor):
    with pytest.raises(ValueError, match=rf"selection.floor must be in \[0, 1\], got {floor}"):
        ActivitySelection(1.0, floor=floor)
    with pytest.raises(ValueError, match="floor"):
        capped_inclusion(np.ones(3), 1.0, 0.1, 0.5, floor=floor)


def test_invalid_annealing_is_rejected():
    with pytest.raises(ValueError, match="selection.beta_end must be >= 0, got -0.5"):
        ActivitySelection(1.0, beta_end=-0.5)
    with pytest.raises(ValueError, match="selection.beta must be >= 0, got -1"):
        ActivitySelection(-1.0, beta_end=1.0)
    with pytest.raises(ValueError, match="round 0 of 10"):
        ActivitySelection(1.0, beta_end=0.0).at_round(0, 10)
    with pytest.raises(ValueError, match="round 1 of 0"):
        UniformSelection().at_round(1, 0)
