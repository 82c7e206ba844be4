"""Which devices train in a round: uniform, or activity-based (P ~ available examples ** beta).

Devices are drawn without replacement by successive sampling proportional to their sampling
weights (implemented with the Gumbel-top-k trick). Devices with no available examples are never
drawn. Inclusion probabilities (needed for unbiased aggregation) are exact for uniform sampling
and estimated by Monte Carlo with the same sampler otherwise.

Fairness floor (`ActivitySelection(floor=...)`): the sampling weights are the mixture
(1 - floor) * a_i / sum(a) + floor * u_i / sum(u), a_i = count_i ** beta, u_i = 1 for devices
with data; so no device with data is starved (activity selection alone almost never draws the
lightest devices). Annealing (`beta_end`): `Selection.at_round` gives the selection for a round,
with beta moving linearly from `beta` at round 1 to `beta_end` at the last round.

Under user-level DP the server samples differently (see `fedtrust.server.user_dp`): Poisson
sampling with inclusion probabilities that depend on each device's own data only, capped at a
public q_max (`capped_inclusion`, `poisson_draw`): the sampler its accountant analyses.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from fedtrust.errors import FederationError

log = logging.getLogger(__name__)


def gumbel_top_k(log_weights: np.ndarray, k: int, rng: np.random.Generator, draws: int = 1):
    """`draws` samples of k distinct indices by successive sampling with P ~ exp(log_weights)."""
    keys = log_weights + rng.gumbel(size=(draws, len(log_weights)))
    return np.argpartition(-keys, k - 1, axis=1)[:, :k]


class Selection:
    """Base class: subclasses only say how much weight each device gets.

    `weights(counts)`: each device's own activity weight, a function of its own count only
    (what user-level DP's capped Poisson sampling needs); `sampling_weights(counts)`: what the
    without-replacement sampler draws with, `weights` mixed with uniform by `floor`.
    """

    name = "base"
    floor: float = 0.0  # share of the uniform distribution in the sampling weights, in [0, 1]

    def weights(self, counts: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def sampling_weights(self, counts: np.ndarray) -> np.ndarray:
        """(1 - floor) * w / sum(w) + floor * u / sum(u), u = 1 where w > 0; w when floor = 0."""
        w = self.weights(np.asarray(counts, dtype=float))
        positive = w > 0
        if self.floor == 0 or not positive.any():
            return w
        return (1 - self.floor) * w / w.sum() + self.floor * positive / positive.sum()

    def at_round(self, server_round: int, total_rounds: int) -> Selection:
        """The selection to use in round `server_round` (1-based) of `total_rounds`: itself."""
        _check_round(server_round, total_rounds)
        return self

    def draw(self, counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """The chosen device indices, sorted."""
        w = self.sampling_weights(np.asarray(counts, dtype=float))
        eligible = int((w > 0).sum())
        if eligible == 0:
            raise FederationError("no device has any available example: nothing can be trained")
        if eligible < k:
            log.warning("only %d devices have data; selecting all of them (asked %d)", eligible, k)
            k = eligible
        with np.errstate(divide="ignore"):
            log_w = np.log(w)
        return np.sort(gumbel_top_k(log_w, k, rng)[0])

    def select(
        self, counts: np.ndarray, k: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (chosen device indices, inclusion probability of every device)."""
        chosen = self.draw(counts, k, rng)
        return chosen, self.inclusion_probabilities(
            self.sampling_weights(np.asarray(counts, float)), len(chosen)
        )

    @staticmethod
    def inclusion_probabilities(
        weights: np.ndarray, k: int, draws: int = 4000, seed: int = 0
    ) -> np.ndarray:
        """P(device i is among the k drawn). Exact when weights are equal, else Monte Carlo.

        The Monte-Carlo estimate is cached by weights, so static populations pay for it once.
        """
        return _inclusion_cached(np.asarray(weights, dtype=float).tobytes(), k, draws, seed).copy()


@functools.lru_cache(maxsize=64)
def _inclusion_cached(weights_bytes: bytes, k: int, draws: int, seed: int) -> np.ndarray:
    weights = np.frombuffer(weights_bytes, dtype=float)
    positive = weights > 0
    if k >= positive.sum():
        return positive.astype(float)
    if np.allclose(weights[positive], weights[positive][0]):
        return positive * (k / positive.sum())
    with np.errstate(divide="ignore"):
        log_w = np.log(weights)
    picks = gumbel_top_k(log_w, k, np.random.default_rng(seed), draws)
    freq = np.bincount(picks.ravel(), minlength=len(weights)) / draws
    # A device with weight > 0 can always be drawn; keep its estimate away from zero.
    return np.where(positive, np.maximum(freq, 1.0 / draws), 0.0)


class UniformSelection(Selection):
    name = "uniform"

    def weights(self, counts: np.ndarray) -> np.ndarray:
        return (counts > 0).astype(float)


class ActivitySelection(Selection):
    """P(select) ~ count ** beta: beta = 1 proportional to data, 0.5 square root, 0 uniform.

    `floor` in [0, 1]: draw with the mixture (1 - floor) * a_i / sum(a) + floor * u_i / sum(u),
    a_i = count_i ** beta, u_i = 1 over the N devices with data (devices with 0 examples are
    still never drawn). Every such device's probability at each draw is then >= floor / N (at
    a later draw its weight is divided by what is left, <= 1), so its inclusion probability in
    a k-draw round is >= 1 - (1 - floor / N) ** k ≈ floor * k / N: at least about `floor` times
    its inclusion probability under uniform selection. floor = 0 is plain activity selection,
    floor = 1 uniform. The inverse-probability and unbiased weightings stay (approximately)
    unbiased: `select` returns the inclusion probabilities of this mixture sampler, estimated by
    Monte Carlo with the same sampler, as for any weights.

    `beta_end`: anneal beta linearly from `beta` at round 1 to `beta_end` at the last round
    (`at_round`); None keeps `beta` throughout. The floor applies in every round.
    """

    name = "activity"

    def __init__(
        self, beta: float = 1.0, floor: float = 0.0, beta_end: float | None = None
    ) -> None:
        if not beta >= 0:
            raise ValueError(f"selection.beta must be >= 0, got {beta}")
        if not 0 <= floor <= 1:
            raise ValueError(f"selection.floor must be in [0, 1], got {floor}")
        if beta_end is not None and not beta_end >= 0:
            raise ValueError(f"selection.beta_end must be >= 0, got {beta_end}")
        self.beta, self.floor, self.beta_end = beta, floor, beta_end

    def weights(self, counts: np.ndarray) -> np.ndarray:
        return np.where(counts > 0, np.power(np.maximum(counts, 1.0), self.beta), 0.0)

    def at_round(self, server_round: int, total_rounds: int) -> Selection:
        """With `beta_end`: a selection with beta interpolated linearly between `beta` (round 1)
        and `beta_end` (round `total_rounds`; rounds past it keep `beta_end`), same floor.
        A one-round run uses `beta`."""
        _check_round(server_round, total_rounds)
        if self.beta_end is None:
            return self
        t = min(1.0, (server_round - 1) / (total_rounds - 1)) if total_rounds > 1 else 0.0
        return ActivitySelection(self.beta + t * (self.beta_end - self.beta), self.floor)

    def __repr__(self) -> str:
        return f"ActivitySelection(beta={self.beta}, floor={self.floor}, beta_end={self.beta_end})"


def _check_round(server_round: int, total_rounds: int) -> None:
    if total_rounds < 1 or server_round < 1:
        raise ValueError(f"rounds are numbered from 1: got round {server_round} of {total_rounds}")


def capped_inclusion(
    weights: np.ndarray,
    reference_weight: float,
    base_rate: float,
    q_max: float,
    floor: float = 0.0,
) -> np.ndarray:
    """Poisson inclusion probabilities p_i = min(q_max, max(floor * base_rate,
    base_rate * w_i / reference_weight)) for w_i > 0, and 0 for w_i = 0.

    Used by user-level DP with activity selection: each device's probability depends on its
    OWN weight and public constants only, so adding or removing a device leaves every other
    device's probability unchanged (what the add/remove-one-device accountant assumes), and the
    public cap q_max, the rate the accountant uses, bounds every device's. A device at the
    public reference weight is sampled at `base_rate` (k/N); heavier devices more often, up to
    q_max, lighter ones less. The expected sample size sum_i p_i is therefore not exactly k;
    the update is still divided by the public k. Devices with weight 0 get 0.

    `floor` in [0, 1] (the selection's fairness floor) lifts every device with data to at least
    floor * base_rate, a public constant: still a function of the device's own weight only, and
    still capped by q_max.
    """
    w = np.asarray(weights, dtype=float)
    if not 0 < q_max <= 1:
        raise ValueError(f"inclusion cap must be in (0, 1], got {q_max}")
    if not reference_weight > 0:
        raise ValueError(f"reference weight must be > 0, got {reference_weight}")
    if not 0 <= floor <= 1:
        raise ValueError(f"inclusion floor must be in [0, 1], got {floor}")
    lifted = np.maximum(floor * base_rate, base_rate * w / reference_weight)
    return np.where(w > 0, np.minimum(q_max, lifted), 0.0)


def poisson_draw(inclusion: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson sampling: each device independently with its probability; sorted indices."""
    p = np.asarray(inclusion, dtype=float)
    return np.flatnonzero(rng.random(len(p)) < p)


def aggregation_weights(
    scheme: str, counts: np.ndarray, chosen: np.ndarray, inclusion: np.ndarray
) -> np.ndarray:
    """Weight of each chosen device's model in the aggregate.

    - examples: n_i (plain weighted FedAvg; over-weights heavy devices when they are also sampled
      more often)
    - equal: 1 (every chosen device counts the same; what user-level DP needs)
    - inverse-probability: n_i / pi_i, normalised (Hajek estimator: approximately unbiased)
    - unbiased: n_i / (n pi_i), NOT normalised (Horvitz-Thompson: the expected update equals the
      full-participation update sum_i n_i / n * delta_i); the server applies it to model deltas.
    """
    n_chosen = counts[chosen].astype(float)
    if scheme == "examples":
        return n_chosen
    if scheme == "equal":
        return np.ones_like(n_chosen)
    if scheme == "inverse-probability":
        return n_chosen / inclusion[chosen]
    if scheme == "unbiased":
        return n_chosen / (counts.sum() * inclusion[chosen])
    raise ValueError(f"unknown weighting {scheme!r}")
