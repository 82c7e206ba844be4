"""Privacy accounting: Google's dp-accounting PLD (the default) and Opacus's RDP, PRV and GDP.

History entries are Opacus's ``(noise_multiplier, sample_rate, steps)`` tuples of the
Poisson-subsampled Gaussian mechanism, so a federated device can persist its history between
rounds and get its cumulative ε with `compute_epsilon`.

``"pld"`` composes dp-accounting's privacy loss distributions (pessimistic estimate): exact up to
the discretisation of the privacy loss (< 0.2 % of ε here) for Poisson sampling under both
neighbouring relations, ``"add-remove"`` (a neighbouring dataset has one example, or one device,
more or less) and ``"replace-one"`` (one example replaced by another). Opacus's accountants
analyse add/remove neighbours only.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from typing import Any

from dp_accounting import NeighboringRelation
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from .errors import BudgetTooSmallError, InvalidPrivacyParameterError

ACCOUNTANTS = ("pld", "rdp", "prv", "gdp")
RELATIONS = ("add-remove", "replace-one")
DEFAULT_DELTA_CAP = 1e-5


def default_delta(num_units: int) -> float:
    """fedtrust's default δ for N protected units (examples or devices): min(1e-5, 0.01 / N).

    Always at least 100x below 1/N, so no unit's data may be released outright with
    probability close to δ·N.
    """
    if num_units < 1:
        raise InvalidPrivacyParameterError(f"need at least one example or device, got {num_units}")
    return min(DEFAULT_DELTA_CAP, 0.01 / num_units)


def resolve_delta(target_delta: float | None, n: int) -> float:
    """The δ a run uses: `target_delta` when it is > 0, else `default_delta(n)` (0 = default)."""
    return target_delta if target_delta is not None and target_delta > 0 else default_delta(n)


History = list[tuple[float, float, int]]

# -- dp-accounting's privacy loss distributions ----------------------------------------------------
_NEIGHBOURS = {
    "add-remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace-one": NeighboringRelation.REPLACE_ONE,
}
# The pessimistic PLD overstates ε by about C·(interval / s)² where s is the standard deviation
# of one step's privacy loss, s ≈ q·sqrt(exp(1/σ²) - 1): ten grid points per s keep that below
# 0.2 % of ε from (σ=0.3, q=0.1, 10 steps) to (σ=50, q=0.001, 1000) and (σ=2, q=0.001, 1e5 steps),
# at a cost of milliseconds to 0.2 s. A fixed grid is either slow for small σ (1e-4: ~1 s) or
# off by up to 30 % for large σ (1e-3).
PLD_POINTS_PER_STD = 10
PLD_MAX_INTERVAL = 5e-3
PLD_MIN_INTERVAL = 1e-9


def pld_interval(noise_multiplier: float, sample_rate: float) -> float:
    """The value_discretization_interval `"pld"` uses for one ``(σ, q)`` history entry."""
    loss_std = sample_rate * math.sqrt(math.expm1(min(noise_multiplier**-2, 700.0)))
    return min(PLD_MAX_INTERVAL, max(PLD_MIN_INTERVAL, loss_std / PLD_POINTS_PER_STD))


@functools.lru_cache(maxsize=32)
def _step_pld(
    sigma: float, q: float, relation: str, interval: float
) -> pld_lib.PrivacyLossDistribution:
    """One step of the Poisson-subsampled Gaussian (what PLDAccountant builds for the event)."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma,
        sampling_prob=q,
        value_discretization_interval=interval,
        pessimistic_estimate=True,
        neighboring_relation=_NEIGHBOURS[relation],
    )


@functools.lru_cache(maxsize=64)
def _composed_pld(
    sigma: float, q: float, steps: int, relation: str, interval: float
) -> pld_lib.PrivacyLossDistribution:
    """`steps` self-compositions of `_step_pld` (FFT; cheap next to building one step)."""
    one = _step_pld(sigma, q, relation, interval)
    return one if steps == 1 else one.self_compose(steps)


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(
    history: tuple[tuple[float, float, int], ...], delta: float, relation: str
) -> float:
    """ε of a canonical history (see `_canonical`; no σ = 0 entry) at `delta`."""
    if not history:
        return 0.0
    interval = min(pld_interval(s, q) for s, q, _ in history)
    total = None
    for s, q, n in history:
        pld = _composed_pld(s, q, n, relation, interval)
        total = pld if total is None else total.compose(pld)
    assert total is not None
    return float(total.get_epsilon_for_delta(delta))


def _canonical(history: Iterable[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """Steps of equal ``(σ, q)`` summed (composition commutes), no-op entries dropped, sorted."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if n > 0 and q > 0:
            steps[(s, q)] = steps.get((s, q), 0) + n
    return tuple(sorted((s, q, n) for (s, q), n in steps.items()))


class PLDAccountant(IAccountant):
    """An Opacus-style accountant backed by dp-accounting's privacy loss distributions.

    Each history entry ``(σ, q, n)`` is dp-accounting's
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), n)``: its PLD is built
    with the same calls `dp_accounting.pld.PLDAccountant` makes (pessimistic estimate, grid
    `pld_interval`), cached by ``(σ, q, n, relation)``, and the entries are composed.
    """

    def __init__(self, relation: str = "add-remove") -> None:
        _check_relation(relation, "pld")
        self.history: History = []
        self.relation = relation

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Account one step (merged into the last entry when σ and q are unchanged)."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.history.pop()
            self.history.append((s, q, n + 1))
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def get_epsilon(self, delta: float, *args: Any, **kwargs: Any) -> float:
        """ε spent by the history at `delta`."""
        return compute_epsilon(self.history, delta, "pld", self.relation)

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    def mechanism(cls) -> str:
        return "pld"

    def state_dict(self, destination: Any = None) -> Any:
        """History, mechanism and neighbouring relation."""
        state = super().state_dict(destination)
        state["relation"] = self.relation
        return state

    def load_state_dict(self, state_dict: Any) -> None:
        """Restore a `state_dict`; refuses one accounted under another neighbouring relation."""
        relation = (state_dict or {}).get("relation", self.relation)
        if relation != self.relation:
            raise InvalidPrivacyParameterError(
                f"state_dict was accounted under relation={relation!r}; this accountant uses "
                f"{self.relation!r}"
            )
        super().load_state_dict(state_dict)


# -- the accounting API ---------------------------------------------------------------------------
def _check_relation(relation: str, accountant: str) -> None:
    if relation not in RELATIONS:
        raise InvalidPrivacyParameterError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if relation != "add-remove" and accountant != "pld":
        raise InvalidPrivacyParameterError(
            f"accountant={accountant!r} cannot analyse relation={relation!r}: Opacus's "
            'accountants analyse add/remove neighbours only; use accountant="pld"'
        )


def _check_accountant(accountant: str, relation: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise InvalidPrivacyParameterError(
            f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}"
        )
    _check_relation(relation, accountant)


def make_accountant(
    mechanism: str,
    history: Iterable[tuple[float, float, int]] = (),
    relation: str = "add-remove",
) -> IAccountant:
    """An accountant of `mechanism` ("pld", "rdp", "prv" or "gdp") holding `history`."""
    _check_accountant(mechanism, relation)
    acc = PLDAccountant(relation) if mechanism == "pld" else create_accountant(mechanism)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def compute_epsilon(
    history: Iterable[tuple[float, float, int]],
    delta: float,
    accountant: str = "pld",
    relation: str = "add-remove",
) -> float:
    """ε spent by a history of ``(noise_multiplier, sample_rate, steps)`` at `delta`."""
    _check_accountant(accountant, relation)
    hist = [(float(s), float(q), int(n)) for s, q, n in history]
    for s, q, n in hist:
        if not (s >= 0 and 0 <= q <= 1 and n >= 0):
            raise InvalidPrivacyParameterError(
                f"history entries need noise_multiplier >= 0, 0 <= sample_rate <= 1 and "
                f"steps >= 0, got {(s, q, n)}"
            )
    if not hist or all(n == 0 for _, _, n in hist):
        return 0.0
    if any(s == 0 for s, q, n in hist if n > 0 and q > 0):
        return math.inf  # a step without noise that may include the protected unit
    if accountant == "pld":
        return _pld_epsilon(_canonical(hist), float(delta), relation)
    return float(make_accountant(accountant, hist).get_epsilon(delta=delta))


def device_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    relation: str = "add-remove",
) -> float:
    """ε of one device after `steps` local DP-SGD steps (all rounds together) at `delta`."""
    return compute_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant, relation)


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
    accountant: str = "pld",
    history: History | None = None,
    tolerance: float = 0.01,
    relation: str = "add-remove",
) -> float:
    """Smallest noise multiplier so that `history` plus `steps` steps spend ≤ `target_epsilon`.

    The result spends between ``target_epsilon - tolerance`` and `target_epsilon`.
    """
    _check_accountant(accountant, relation)
    with warnings.catch_warnings():
        # large trial noise levels of the search hit the top of Opacus's alpha grid; harmless
        # there (the ε reported for the chosen noise is computed, and warned about, elsewhere)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return _calibrate(
            target_epsilon,
            target_delta,
            sample_rate,
            steps,
            accountant,
            history,
            tolerance,
            relation,
        )


def _calibrate(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    history: History | None,
    tolerance: float,
    relation: str,
) -> float:
    if steps < 1:
        raise InvalidPrivacyParameterError(f"planned steps must be >= 1, got {steps}")
    if history and compute_epsilon(history, target_delta, accountant, relation) >= target_epsilon:
        raise BudgetTooSmallError(
            f"the device already spent epsilon >= {target_epsilon}; no step is possible"
        )
    if not history and accountant != "pld":
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

    # the bisection of opacus.accountants.utils.get_noise_multiplier, on top of a history
    def eps(sigma: float) -> float:
        return compute_epsilon(
            list(history or []) + [(sigma, sample_rate, steps)], target_delta, accountant, relation
        )

    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            left, more = ("left after the device's history ", "more ") if history else ("", "")
            raise BudgetTooSmallError(
                f"epsilon={target_epsilon}, delta={target_delta} {left}is too small for {steps} "
                f"{more}steps at sample rate {sample_rate:.3g} (noise multiplier would exceed "
                f"{MAX_SIGMA:g})"
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
    accountant: str = "pld",
    known_safe: int = 0,
    cap: int = 10_000_000,
    relation: str = "add-remove",
) -> int:
    """Largest n ≥ `known_safe` such that `history` plus n more steps spend ≤ `target_epsilon`.

    The answer n always spends ≤ `target_epsilon` and n + 1 steps more (unless n = `cap`).
    """
    _check_accountant(accountant, relation)

    def ok(n: int) -> bool:
        hist = list(history) + ([(noise_multiplier, sample_rate, n)] if n else [])
        return compute_epsilon(hist, delta, accountant, relation) <= target_epsilon

    if not ok(0):
        return 0
    lo = 0
    if known_safe > 0:
        if ok(min(known_safe, cap)):
            lo = min(known_safe, cap)
        else:
            return _bisect_steps(ok, 0, known_safe)
    # gallop up from the last step count known to fit: lo+1, lo+3, lo+7, ...
    gap = 1
    while lo < cap:
        hi = min(lo + gap, cap)
        if not ok(hi):
            return _bisect_steps(ok, lo, hi)
        lo, gap = hi, 2 * gap
    return cap


def _bisect_steps(ok: Any, lo: int, hi: int) -> int:
    """Given ok(lo) and not ok(hi): an n in [lo, hi) with ok(n) and not ok(n + 1)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
