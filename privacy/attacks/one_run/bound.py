"""The one-run audit's maths: the p-value bound, ε lower bounds from guesses, and a simulated
Gaussian release (Steinke, Nasr & Jagielski 2023; see `fedtrust.privacy.attacks.one_run`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

Score = Literal["llr", "sum"]
SeedLike = np.random.Generator | int | None

DEFAULT_SPLITS = (1.0, 0.5)
_EPS_CAP = 100.0
_SIGMA_FLOOR = 1e-3


# -- the bound ------------------------------------------------------------------------------------
def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[≥ `correct` of `guesses` guesses right] for an (ε, δ)-DP mechanism.

    Steinke et al. 2023 (δ = 0: W is dominated by Binomial(r, e^ε/(1+e^ε))) and their δ > 0
    bound, as their appendix computes it: f(v) + 2mδ · max_{1≤i≤v} (f(v-i) - f(v)) / i with
    f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v].
    """
    _check_counts(m, guesses, correct)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    if correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    beta = float(stats.binom.sf(correct - 1, guesses, p))  # f(v) = P[Bin(r, p) >= v]
    if delta > 0:
        # (f(v-i) - f(v)) = P[v-i <= Bin < v] for i = 1..v: cumulative pmf from v-1 downwards
        pmf = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, correct + 1)))
        beta += 2.0 * m * delta * alpha
    return min(beta, 1.0)


def epsilon_lower_bound(
    m: int, guesses: int, correct: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """Largest ε refuted at `confidence` by `correct` right of `guesses` guesses on m canaries.

    That is, an (ε, δ)-DP mechanism would produce ≥ `correct` right guesses with probability
    below 1 - `confidence` (`p_value`). Bisection on ε; the returned ε always satisfies
    p_value < 1 - confidence itself (a valid refutation, hence of every smaller ε too), and is
    0 when even ε = 0 is not refuted (no evidence).
    """
    _check_counts(m, guesses, correct)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if guesses == 0 or p_value(m, guesses, correct, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, guesses, correct, hi, delta) < level:
        lo, hi = hi, 2 * hi
        if hi > _EPS_CAP:
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m, guesses, correct, mid, delta) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    return lo


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")


# -- guessing from scores -------------------------------------------------------------------------
@dataclass(frozen=True)
class OneRunAudit:
    """Result of a one-run audit: ε lower bound (at `confidence`, for the stated δ)."""

    m: int  # canaries
    guesses: int  # r = k_plus + k_minus of the reported guess
    correct: int  # right guesses among them
    epsilon_lower_bound: float  # the mechanism is not (ε, δ)-DP for any ε below this
    confidence: float  # overall, after the Bonferroni split over `grid_size` guess counts
    delta: float
    k_plus: int  # guessed IN: the k_plus highest scores
    k_minus: int  # guessed OUT: the k_minus lowest scores
    grid_size: int = 1  # guesses tried (each tested at confidence 1 - (1-conf)/grid_size)

    def report(self, claimed_epsilon: float, canaries: str) -> dict[str, Any]:
        """The audit next to the ε it checks, as a run's summary states it."""
        return {
            "method": f"one-run audit (Steinke, Nasr & Jagielski 2023), {canaries}",
            "claimed_epsilon": claimed_epsilon,
            "audited_epsilon_lower_bound": self.epsilon_lower_bound,
            "delta": self.delta,
            "confidence": self.confidence,
            "canaries": self.m,
            "guesses": self.guesses,
            "correct": self.correct,
            "passed": self.epsilon_lower_bound <= claimed_epsilon,
        }


def default_guess_counts(m: int) -> list[int]:
    """Total guess counts tried by default: m, m/3, m/9, m/27, m/81 (rounded up, distinct)."""
    return sorted({math.ceil(m / 3**k) for k in range(5)})


def audit_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
    splits: Sequence[float] | None = None,
    center: float | None = None,
) -> OneRunAudit:
    """Best ε lower bound over a fixed grid of guesses, Bonferroni-corrected.

    Higher score = more likely IN. For every total r in `guess_counts` (default
    `default_guess_counts(m)`) the attacker makes r guesses in each of these ways:

    - for every fraction s in `splits`: IN on the round(s·r) highest and OUT on the
      r - round(s·r) lowest scores;
    - if `center` is given (a score the attacker deems equally likely IN and OUT, e.g. 0 for a
      log-likelihood ratio): the r scores farthest from `center`, IN above it and OUT below.

    `splits` defaults to (1.0, 0.5), or to none when `center` is given. Every one of the G
    guesses of the grid is tested at level (1 - confidence)/G, so the best of them is still a
    valid lower bound at `confidence` (the guesses depend on the scores only, never on the
    inclusion bits). Ties are broken by canary index (independent of the inclusion bits).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included).reshape(-1).astype(bool)
    m = len(s)
    if len(inc) != m or m == 0:
        raise ValueError(f"need as many inclusion bits as scores (> 0), got {len(inc)} and {m}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    counts = default_guess_counts(m) if guess_counts is None else [int(r) for r in guess_counts]
    if not counts or any(not 1 <= r <= m for r in counts):
        raise ValueError(f"guess counts must be in [1, m={m}], got {counts}")
    if splits is None:
        splits = DEFAULT_SPLITS if center is None else ()
    if any(not 0 <= f <= 1 for f in splits):
        raise ValueError(f"splits must be fractions in [0, 1], got {list(splits)}")
    if not splits and center is None:
        raise ValueError("give at least one split or a center")
    grid = sorted({(round(f * r), r - round(f * r)) for r in counts for f in splits})
    order = np.argsort(-s, kind="stable")  # highest first
    hit_top = np.concatenate([[0], np.cumsum(inc[order])])  # IN among the k highest
    hit_bottom = np.concatenate([[0], np.cumsum(~inc[order[::-1]])])  # OUT among k lowest
    if center is not None:
        grid += [(-r, 0) for r in sorted(set(counts))]  # marker: r farthest from the center
        far = np.argsort(-np.abs(s - center), kind="stable")
        above = s[far] > center
        right = np.where(above, inc[far], ~inc[far])
        hit_far = np.concatenate([[0], np.cumsum(right)])
        ins_far = np.concatenate([[0], np.cumsum(above)])
    per_guess = 1.0 - (1.0 - confidence) / len(grid)
    best: OneRunAudit | None = None
    for a, b in grid:
        if a < 0:  # around the center
            r = -a
            v, k_plus = int(hit_far[r]), int(ins_far[r])
            k_minus = r - k_plus
        else:
            k_plus, k_minus, r = a, b, a + b
            v = int(hit_top[k_plus] + hit_bottom[k_minus])
        eps = epsilon_lower_bound(m, r, v, delta, per_guess)
        if best is None or eps > best.epsilon_lower_bound:
            best = OneRunAudit(m, r, v, eps, confidence, delta, k_plus, k_minus, len(grid))
    assert best is not None
    return best


# -- input-space (black-box) canaries -------------------------------------------------------------
def split_canaries(m: int, rng: SeedLike = None) -> np.ndarray:
    """m secret inclusion bits, each True (train on the canary) with probability 1/2."""
    if m < 1:
        raise ValueError(f"need at least one canary, got {m}")
    return np.random.default_rng(rng).random(m) < 0.5


def audit_from_losses(
    losses: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
) -> OneRunAudit:
    """`audit_from_scores` on -loss (e.g. `example_scores(model, task, canary_rows)["loss"]`)."""
    return audit_from_scores(
        -np.asarray(losses, dtype=np.float64), included, delta, confidence, guess_counts
    )


# -- scores of the Dirac canaries -----------------------------------------------------------------
def guess_center(score: Score, steps: int, q: float) -> float:
    """The score at which a Dirac canary is as likely IN as OUT after `steps` steps at rate q."""
    if score == "llr":
        return 0.0
    if score == "sum":
        return steps * q / 2
    raise ValueError(f"score must be 'llr' or 'sum', got {score!r}")


def step_llr(y: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """log-likelihood ratio of one step: y ~ (1-q)N(0,σ²) + qN(1,σ²) against N(0,σ²).

    σ is floored at 1e-3 (σ = 0: no noise, or noise replayed away), where the ratio is still
    finite and 0 remains the point where IN and OUT are equally likely.
    """
    z = (y - 0.5) / max(sigma, _SIGMA_FLOOR) ** 2
    if q >= 1:
        return z
    return np.logaddexp(math.log1p(-q), math.log(q) + z)


def audit_gaussian_mechanism(
    m: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    rng: SeedLike = None,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
    score: Score = "llr",
) -> OneRunAudit:
    """Audit DP-SGD's release on the canary coordinates alone, with no model.

    Exactly what `GradientCanaries` sees when no real example touches the canary coordinates:
    per step and canary, y = b + N(0, σ²) in units of C, b ~ Bernoulli(q) for an IN canary and
    0 for an OUT one. Fast (m x steps normal draws); pass a σ below the claimed one to play a
    broken mechanism.
    """
    if steps < 1 or not 0 < sample_rate <= 1 or noise_multiplier < 0:
        raise ValueError(
            f"need steps >= 1, sample rate in (0, 1], noise >= 0; got {steps}, {sample_rate}, "
            f"{noise_multiplier}"
        )
    center = guess_center(score, steps, sample_rate)
    gen = np.random.default_rng(rng)
    included = split_canaries(m, gen)
    total = np.zeros(m)
    for _ in range(steps):
        y = (included & (gen.random(m) < sample_rate)) + noise_multiplier * gen.standard_normal(m)
        total += y if score == "sum" else step_llr(y, noise_multiplier, sample_rate)
    return audit_from_scores(total, included, delta, confidence, guess_counts, center=center)
