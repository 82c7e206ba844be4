"""The "pld" accountant (dp-accounting's privacy loss distributions) against independent references.

References: the exact ε of the Gaussian mechanism (Balle & Wang 2018, solved here with scipy),
dp-accounting's own `RdpAccountant` and `PLDAccountant` fed dp-accounting's DpEvents, and
Opacus's PRV accountant (a different numerical method).
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant as DpPLDAccountant
from dp_accounting.rdp import RdpAccountant
from privacy_helpers import Regressor, regression_batch, row_loader
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

from fedtrust.privacy import (
    RELATIONS,
    InvalidPrivacyParameterError,
    PrivacyBudgetExhausted,
    PrivacyEngine,
    calibrate_noise,
    compute_epsilon,
    device_epsilon,
    max_steps,
)
from fedtrust.privacy.accounting import PLDAccountant, make_accountant, pld_interval

NEIGHBOURS = {
    "add-remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace-one": NeighboringRelation.REPLACE_ONE,
}

# (history, delta): Poisson-subsampled Gaussian histories from one step at q = 0.1 to 5000
# steps at q = 0.004, one with two entries, one without subsampling
HISTORIES = [
    ([(1.1, 0.1, 20)], 1e-3),
    ([(1.0, 0.01, 1000)], 1e-5),
    ([(0.6, 0.01, 1000)], 1e-5),
    ([(2.0, 0.004, 5000)], 1e-6),
    ([(0.9, 0.1, 50), (1.5, 0.05, 200)], 1e-5),
    ([(5.0, 1.0, 10)], 1e-5),
]
IDS = [f"{h}@{d:g}" for h, d in HISTORIES]


def gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Exact ε of the Gaussian mechanism (Balle & Wang 2018, Theorem 8) at `delta`.

    delta(eps) = Phi(-eps*s + 1/(2s)) - e^eps * Phi(-eps*s - 1/(2s)), s = sigma / sensitivity.
    """
    s = sigma / sensitivity

    def excess(eps: float) -> float:
        return (
            ndtr(-eps * s + 1 / (2 * s)) - math.exp(eps + log_ndtr(-eps * s - 1 / (2 * s))) - delta
        )

    return brentq(excess, 0.0, 500.0, xtol=1e-12, rtol=1e-12) if excess(0.0) > 0 else 0.0


def events(history):
    return [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n
        )
        for s, q, n in history
    ]


def dp_pld_epsilon(history, delta, relation="add-remove", interval=None):
    """dp-accounting's PLDAccountant on the DpEvents of `history` (grid `interval`)."""
    if interval is None:
        interval = min(pld_interval(s, q) for s, q, _ in history)
    acc = DpPLDAccountant(NEIGHBOURS[relation], value_discretization_interval=interval)
    for event in events(history):
        acc.compose(event)
    return acc.get_epsilon(delta)


def dp_rdp_epsilon(history, delta):
    """dp-accounting's RdpAccountant (orders >= 2, where its series for fractional orders
    converge; the optimal order of these histories is above 2)."""
    orders = [o for o in RdpAccountant()._orders.tolist() if o >= 2]
    acc = RdpAccountant(orders)
    for event in events(history):
        acc.compose(event)
    return acc.get_epsilon(delta)


# -- exactness: the Gaussian mechanism without subsampling ----------------------------------------
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("relation,sensitivity", [("add-remove", 1.0), ("replace-one", 2.0)])
def test_unsampled_single_step_is_the_exact_gaussian_mechanism(sigma, relation, sensitivity):
    exact = gaussian_epsilon(sigma, 1e-5, sensitivity)
    eps = compute_epsilon([(sigma, 1.0, 1)], 1e-5, "pld", relation)
    assert eps == pytest.approx(exact, rel=5e-3)
    assert eps >= exact * (1 - 1e-9)  # the pessimistic estimate never understates ε


@pytest.mark.parametrize("relation,sensitivity", [("add-remove", 1.0), ("replace-one", 2.0)])
def test_unsampled_composition_is_one_gaussian_with_the_summed_variance(relation, sensitivity):
    # n Gaussian steps of std σ compose to one Gaussian of std σ / sqrt(n)
    exact = gaussian_epsilon(10.0 / math.sqrt(100), 1e-5, sensitivity)
    eps = device_epsilon(10.0, 1.0, 100, 1e-5, "pld", relation)
    assert exact * (1 - 1e-9) <= eps <= exact * 1.005


# -- agreement with independent accountants -------------------------------------------------------
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # PRV, q=1
@pytest.mark.parametrize("history,delta", HISTORIES, ids=IDS)
def test_rdp_prv_and_pld_against_independent_accountants(history, delta):
    reference_rdp = dp_rdp_epsilon(history, delta)
    rdp = compute_epsilon(history, delta, "rdp")
    pld = compute_epsilon(history, delta, "pld")
    prv = compute_epsilon(history, delta, "prv")
    # Opacus's RDP and dp-accounting's RDP: same bound, different order grids
    assert rdp == pytest.approx(reference_rdp, rel=0.01)
    # PLD is (near) exact, RDP an upper bound: 6-30 % looser on these histories
    assert pld < reference_rdp and pld < rdp
    # dp-accounting's PLDAccountant fed the DpEvents: the same computation on the same grid
    assert pld == pytest.approx(dp_pld_epsilon(history, delta), rel=1e-9)
    # Opacus's PRV accountant is a different numerical method, also (near) exact: it agrees
    # with PLD, not with RDP, within its default eps_error=0.01 plus ~1 % (its own upper
    # estimate and domain truncation); measured 0.1-1.6 % above PLD here
    assert prv == pytest.approx(pld, rel=0.01, abs=0.02)


@pytest.mark.parametrize("history,delta", HISTORIES[:2], ids=IDS[:2])
def test_pld_grid_is_accurate_against_a_fine_grid(history, delta):
    # dp-accounting's default grid (1e-4), 10-50x finer than pld_interval here
    fine = dp_pld_epsilon(history, delta, interval=1e-4)
    assert compute_epsilon(history, delta) == pytest.approx(fine, rel=5e-3)


@pytest.mark.parametrize("history,delta", HISTORIES, ids=IDS)
def test_replace_one_spends_more_than_add_remove(history, delta):
    add_remove = compute_epsilon(history, delta, "pld", "add-remove")
    replace_one = compute_epsilon(history, delta, "pld", "replace-one")
    assert replace_one > add_remove * 1.05
    independent = dp_pld_epsilon(history, delta, "replace-one")
    assert replace_one == pytest.approx(independent, rel=1e-9)


# -- noise calibration and budget -----------------------------------------------------------------
@pytest.mark.parametrize("target,q,steps", [(8.0, 0.01, 1000), (1.0, 0.01, 1000), (3.0, 0.1, 30)])
def test_pld_calibrates_less_noise_than_rdp_and_hits_the_target(target, q, steps):
    sigma_pld = calibrate_noise(target, 1e-5, q, steps)  # "pld" is the default
    sigma_rdp = calibrate_noise(target, 1e-5, q, steps, "rdp")
    assert sigma_pld < sigma_rdp
    eps = compute_epsilon([(sigma_pld, q, steps)], 1e-5)
    assert target - 0.01 <= eps <= target
    # the independent accountant on a 10x finer grid agrees that the target holds
    fine = pld_interval(sigma_pld, q) / 10
    assert dp_pld_epsilon([(sigma_pld, q, steps)], 1e-5, interval=fine) <= target * 1.001


def test_calibration_and_max_steps_under_replace_one():
    sigma = calibrate_noise(8.0, 1e-5, 0.01, 1000, relation="replace-one")
    assert sigma > calibrate_noise(8.0, 1e-5, 0.01, 1000)
    assert 7.99 <= device_epsilon(sigma, 0.01, 1000, 1e-5, relation="replace-one") <= 8.0
    n = max_steps([], sigma, 0.01, 1e-5, 8.0, known_safe=1000, relation="replace-one")
    assert n >= 1000
    assert dp_pld_epsilon([(sigma, 0.01, n)], 1e-5, "replace-one") <= 8.0
    assert dp_pld_epsilon([(sigma, 0.01, n + 1)], 1e-5, "replace-one") > 8.0


# -- relation errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_opacus_accountants_refuse_replace_one(accountant):
    calls = [
        lambda: compute_epsilon([(1.0, 0.1, 10)], 1e-5, accountant, "replace-one"),
        lambda: calibrate_noise(4.0, 1e-5, 0.1, 10, accountant, relation="replace-one"),
        lambda: max_steps([], 1.0, 0.1, 1e-5, 4.0, accountant, relation="replace-one"),
        lambda: make_accountant(accountant, [], "replace-one"),
        lambda: PrivacyEngine(accountant=accountant, relation="replace-one"),
    ]
    for call in calls:
        with pytest.raises(InvalidPrivacyParameterError) as exc:
            call()
        msg = str(exc.value)
        assert "\n" not in msg and "add/remove" in msg and 'accountant="pld"' in msg


def test_unknown_relation_names_the_allowed_values():
    assert RELATIONS == ("add-remove", "replace-one")
    for accountant in ("pld", "rdp"):
        with pytest.raises(InvalidPrivacyParameterError) as exc:
            compute_epsilon([(1.0, 0.1, 10)], 1e-5, accountant, "swap")
        assert "'add-remove'" in str(exc.value) and "'replace-one'" in str(exc.value)
    with pytest.raises(InvalidPrivacyParameterError, match="'replace-one'"):
        PrivacyEngine(relation="substitute")


# -- the accountant object and the engine ---------------------------------------------------------
def test_pld_accountant_object_merges_steps_and_round_trips():
    acc = make_accountant("pld", [], "replace-one")
    assert isinstance(acc, PLDAccountant) and acc.mechanism() == "pld"
    for sigma in (1.0, 1.0, 1.0, 0.8):
        acc.step(noise_multiplier=sigma, sample_rate=0.1)
    assert acc.history == [(1.0, 0.1, 3), (0.8, 0.1, 1)] and len(acc) == 2
    assert acc.get_epsilon(1e-5) == pytest.approx(
        dp_pld_epsilon(acc.history, 1e-5, "replace-one"), rel=1e-9
    )
    state = acc.state_dict()
    assert state["relation"] == "replace-one" and state["mechanism"] == "pld"
    again = PLDAccountant("replace-one")
    again.load_state_dict(state)
    assert again.history == acc.history
    with pytest.raises(InvalidPrivacyParameterError, match="relation"):
        PLDAccountant("add-remove").load_state_dict(state)


N, B = 40, 4  # q = 0.1


def make_private(engine, **kw):
    model = Regressor().double()
    kw.setdefault("max_grad_norm", 1.0)
    return engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=row_loader(regression_batch(N), B),
        noise_generator=torch.Generator().manual_seed(0),
        **kw,
    )


@pytest.mark.parametrize("relation", RELATIONS)
def test_engine_epsilon_is_dp_accountings_pld(relation):
    engine = PrivacyEngine(accountant="pld", relation=relation)
    model, opt, loader = make_private(engine, noise_multiplier=1.1)
    for _ in range(2):
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    assert engine.steps == 20 and engine.accountant.history == [(1.1, 0.1, 20)]
    eps = engine.get_epsilon(1e-3)
    assert eps == pytest.approx(dp_pld_epsilon([(1.1, 0.1, 20)], 1e-3, relation), rel=1e-9)
    assert eps == compute_epsilon([(1.1, 0.1, 20)], 1e-3, "pld", relation)
    fine = pld_interval(1.1, 0.1) / 10  # and on a 10x finer grid
    assert eps == pytest.approx(dp_pld_epsilon([(1.1, 0.1, 20)], 1e-3, relation, fine), rel=5e-3)
    spent = engine.privacy_spent(1e-3)
    assert (spent.accountant, spent.relation, spent.steps) == ("pld", relation, 20)
    state = engine.state_dict()
    assert state["relation"] == relation and state["mechanism"] == "pld"
    follow_up = PrivacyEngine(relation=relation)
    follow_up.load_state_dict(state)
    assert follow_up.get_epsilon(1e-3) == eps


@pytest.mark.parametrize("relation", RELATIONS)
def test_engine_budget_with_pld_stops_at_the_last_step_within_target(relation):
    engine = PrivacyEngine(accountant="pld", relation=relation)
    model, opt, loader = make_private(
        engine, noise_multiplier=1.0, target_epsilon=1.5, target_delta=1e-3
    )
    with pytest.raises(PrivacyBudgetExhausted):
        for _ in range(100):
            for batch in loader:
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
    n = engine.steps
    assert n > 1 and engine.budget_exhausted
    assert dp_pld_epsilon([(1.0, 0.1, n)], 1e-3, relation) <= 1.5
    assert dp_pld_epsilon([(1.0, 0.1, n + 1)], 1e-3, relation) > 1.5
    assert engine.get_epsilon() <= 1.5
    assert n == max_steps([], 1.0, 0.1, 1e-3, 1.5, relation=relation)
