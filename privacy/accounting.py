"""Privacy accounting through Opacus's accountants (RDP, PRV, GDP): nothing hand-written.

History entries are Opacus's ``(noise_multiplier, sample_rate, steps)`` tuples, so a federated
device can persist its history between rounds and get its cumulative ε with `compute_epsilon`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from .errors import BudgetTooSmallError, InvalidPrivacyParameterError

ACCOUNTANTS = ("rdp", "prv", "gdp")
DEFAULT_DELTA_CAP = 1e-5


def default_delta(num_units: int) -> float:
    """fedtrust's default δ for N protected units (examples or devices): min(1e-5, 0.01 / N).

    Always at least 100x below 1/N, so no unit's data may be released outright with
    probability close to δ·N.
    """
    if num_units < 1:
        raise InvalidPrivacyParameterError(f"need at least one example or device, got {num_units}")
    return min(DEFAULT_DELTA_CAP, 0.01 / num_units)
History = list[tuple[float, float, int]]


def make_accountant(
    mechanism: str, history: Iterable[tuple[float, float, int]] = ()
) -> IAccountant:
    """An Opacus accountant of `mechanism` ("rdp", "prv" or "gdp") holding `history`."""
    if mechanism not in ACCOUNTANTS:
        raise InvalidPrivacyParameterError(
            f"accountant must be one of {ACCOUNTANTS}, got {mechanism!r}"
        )
    acc = create_accountant(mechanism=mechanism)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def compute_epsilon(
    history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """ε spent by a history of ``(noise_multiplier, sample_rate, steps)`` at `delta`."""
    hist = list(history)
    if not hist or all(n == 0 for _, _, n in hist):
        return 0.0
    if any(s == 0 for s, _, n in hist if n > 0):
        return math.inf
    return float(make_accountant(accountant, hist).get_epsilon(delta=delta))


def device_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε of one device after `steps` local DP-SGD steps (all rounds together) at `delta`."""
    return compute_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)


def check_epsilon_delta(epsilon: float | None, delta: float | None, dataset_size: int) -> None:
    """Raise `InvalidPrivacyParameterError` unless ε > 0 and 0 < δ < 1/N."""
    if epsilon is not None and not epsilon > 0:
        raise InvalidPrivacyParameterError(f"target_epsilon must be > 0, got {epsilon}")
    if delta is None:
        if epsilon is not None:
            raise InvalidPrivacyParameterError("target_delta is required with target_epsilon")
        return
    if not 0 < delta < 1 / dataset_size:
        raise InvalidPrivacyParameterError(
            f"target_delta must be in (0, 1/N) = (0, {1 / dataset_size:.3g}) for N="
            f"{dataset_size} samples, got {delta}"
        )


def calibrate_noise(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    history: History | None = None,
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier so that `history` plus `steps` steps spend ≤ `target_epsilon`."""
    with warnings.catch_warnings():
        # large trial noise levels of the search hit the top of Opacus's alpha grid; harmless
        # there (the ε reported for the chosen noise is computed, and warned about, elsewhere)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return _calibrate(
            target_epsilon, target_delta, sample_rate, steps, accountant, history, tolerance
        )


def _calibrate(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    history: History | None,
    tolerance: float,
) -> float:
    if steps < 1:
        raise InvalidPrivacyParameterError(f"planned steps must be >= 1, got {steps}")
    if history and compute_epsilon(history, target_delta, accountant) >= target_epsilon:
        raise BudgetTooSmallError(
            f"the device already spent epsilon >= {target_epsilon}; no step is possible"
        )
    if not history:
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=target_delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=tolerance,
                )
            )
        except ValueError as exc:
            raise BudgetTooSmallError(
                f"epsilon={target_epsilon}, delta={target_delta} is too small for {steps} steps "
                f"at sample rate {sample_rate:.3g} (noise multiplier would exceed {MAX_SIGMA:g})"
            ) from exc

    # same bisection as opacus.accountants.utils.get_noise_multiplier, on top of a history
    def eps(sigma: float) -> float:
        return compute_epsilon(
            list(history) + [(sigma, sample_rate, steps)], target_delta, accountant
        )

    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise BudgetTooSmallError(
                f"epsilon={target_epsilon} left after the device's history is too small "
                f"for {steps} more steps"
            )
    while target_epsilon - eps(high) > tolerance and high - low > 1e-6:
        mid = (low + high) / 2
        if eps(mid) < target_epsilon:
            high = mid
        else:
            low = mid
    return high


def max_steps(
    history: History,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    target_epsilon: float,
    accountant: str = "rdp",
    known_safe: int = 0,
    cap: int = 10_000_000,
) -> int:
    """Largest n ≥ `known_safe` such that `history` plus n more steps spend ≤ `target_epsilon`."""

    def ok(n: int) -> bool:
        hist = list(history) + ([(noise_multiplier, sample_rate, n)] if n else [])
        return compute_epsilon(hist, delta, accountant) <= target_epsilon

    if not ok(0):
        return 0
    lo, hi = 0, max(1, known_safe)
    if ok(hi):
        lo, hi = hi, 2 * hi
        while ok(hi):
            lo, hi = hi, 2 * hi
            if hi > cap:
                return cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
