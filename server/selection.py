"""Which devices train in a round: uniform, or activity-based (P ~ available examples ** beta).

Devices are drawn without replacement by successive sampling proportional to their weights
(implemented with the Gumbel-top-k trick). Devices with no available examples are never drawn.
Inclusion probabilities (needed for unbiased aggregation) are exact for uniform sampling and
estimated by Monte Carlo with the same sampler otherwise.

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
    """Base class: subclasses only say how much weight each device gets."""

    name = "base"

    def weights(self, counts: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def draw(self, counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """The chosen device indices, sorted."""
        w = self.weights(np.asarray(counts, dtype=float))
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
            self.weights(np.asarray(counts, float)), len(chosen)
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
    """P(select) ~ count ** beta: beta = 1 proportional to data, 0.5 square root, 0 uniform."""

    name = "activity"

    def __init__(self, beta: float = 1.0) -> None:
        if beta < 0:
            raise ValueError(f"selection.beta must be >= 0, got {beta}")
        self.beta = beta

    def weights(self, counts: np.ndarray) -> np.ndarray:
        return np.where(counts > 0, np.power(np.maximum(counts, 1.0), self.beta), 0.0)


def capped_inclusion(
    weights: np.ndarray, reference_weight: float, base_rate: float, q_max: float
) -> np.ndarray:
    """Poisson inclusion probabilities p_i = min(q_max, base_rate * w_i / reference_weight).

    Used by user-level DP with activity selection: each device's probability depends on its
    OWN weight and public constants only, so adding or removing a device leaves every other
    device's probability unchanged (what the add/remove-one-device accountant assumes), and the
    public cap q_max, the rate the accountant uses, bounds every device's. A device at the
    public reference weight is sampled at `base_rate` (k/N); heavier devices more often, up to
    q_max, lighter ones less. The expected sample size sum_i p_i is therefore not exactly k;
    the update is still divided by the public k. Devices with weight 0 get 0.
    """
    w = np.asarray(weights, dtype=float)
    if not 0 < q_max <= 1:
        raise ValueError(f"inclusion cap must be in (0, 1], got {q_max}")
    if not reference_weight > 0:
        raise ValueError(f"reference weight must be > 0, got {reference_weight}")
    return np.minimum(q_max, base_rate * w / reference_weight)


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
