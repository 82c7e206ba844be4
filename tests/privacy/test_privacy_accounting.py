"""ε bookkeeping against Opacus's accountants, noise calibration, budget exhaustion, rounds."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from privacy_helpers import Regressor, regression_batch, row_loader

from fedtrust.privacy import (
    PrivacyBudgetExhausted,
    PrivacyEngine,
    calibrate_noise,
    compute_epsilon,
    default_delta,
    device_epsilon,
    max_steps,
    resolve_delta,
)

N, B = 40, 4  # q = 0.1


def train(engine, stop_after=None, loop_epochs=1, **kw):
    model = Regressor().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw.setdefault("max_grad_norm", 1.0)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=row_loader(regression_batch(N), B),
        noise_generator=torch.Generator().manual_seed(0),
        **kw,
    )
    taken = 0
    for _ in range(loop_epochs):
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            taken += 1
            if stop_after is not None and engine.steps >= stop_after:
                return model, opt
    return model, opt


@pytest.mark.parametrize("mechanism,opacus_cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_opacus_accountant(mechanism, opacus_cls):
    engine = PrivacyEngine(accountant=mechanism)
    train(engine, loop_epochs=2, noise_multiplier=1.1)
    assert engine.steps == 20  # Poisson: empty batches are noise-only steps, still counted
    ref = opacus_cls()
    for _ in range(engine.steps):
        ref.step(noise_multiplier=1.1, sample_rate=0.1)
    assert engine.get_epsilon(1e-3) == pytest.approx(ref.get_epsilon(delta=1e-3), rel=1e-9)
    assert device_epsilon(1.1, 0.1, 20, 1e-3, mechanism) == pytest.approx(ref.get_epsilon(1e-3))


def test_calibrated_sigma_hits_target():
    engine = PrivacyEngine(accountant="rdp")
    train(engine, stop_after=1, target_epsilon=3.0, target_delta=1e-3, epochs=3)
    sigma = engine.noise_multiplier
    assert sigma == pytest.approx(
        get_noise_multiplier(
            target_epsilon=3.0, target_delta=1e-3, sample_rate=0.1, steps=30, epsilon_tolerance=0.01
        )
    )
    planned = 30
    eps = compute_epsilon([(sigma, 0.1, planned)], 1e-3, "rdp")
    assert 3.0 - 0.02 < eps <= 3.0
    assert calibrate_noise(3.0, 1e-3, 0.1, planned, "rdp") == pytest.approx(sigma)


def test_budget_exhausted_raises_before_exceeding_and_changes_nothing():
    engine = PrivacyEngine()
    model = Regressor().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=row_loader(regression_batch(N), B),
        noise_multiplier=1.0,
        target_epsilon=1.5,
        target_delta=1e-3,
    )
    with pytest.raises(PrivacyBudgetExhausted) as info:
        for _ in range(100):
            for batch in loader:
                model(**batch).loss.backward()
                snapshot = model.lin.weight.detach().clone()
                opt.step()
                opt.zero_grad()
    n = engine.steps
    assert compute_epsilon([(1.0, 0.1, n)], 1e-3) <= 1.5
    assert compute_epsilon([(1.0, 0.1, n + 1)], 1e-3) > 1.5
    assert engine.get_epsilon() <= 1.5 and engine.budget_exhausted
    assert info.value.epsilon_spent == pytest.approx(engine.get_epsilon())
    torch.testing.assert_close(model.lin.weight.detach(), snapshot)  # the refused step did nothing
    assert model.lin.weight.grad is None
    assert n == max_steps([], 1.0, 0.1, 1e-3, 1.5)


def test_history_carries_over_federated_rounds():
    first = PrivacyEngine()
    train(first, stop_after=7, noise_multiplier=0.9, loop_epochs=5)
    second = PrivacyEngine()
    second.load_state_dict(first.state_dict())
    train(second, stop_after=5, noise_multiplier=0.9, loop_epochs=5)
    total = device_epsilon(0.9, 0.1, 12, 1e-3)
    assert second.get_epsilon(1e-3) == pytest.approx(total)
    spent = second.privacy_spent(1e-3)
    assert spent.steps == 12 and spent.epsilon == pytest.approx(total)
    third = PrivacyEngine(history=list(second.accountant.history))
    train(third, stop_after=1, target_epsilon=total + 1.0, target_delta=1e-3, steps=10)
    eps = compute_epsilon(second.accountant.history + [(third.noise_multiplier, 0.1, 10)], 1e-3)
    assert total + 1.0 - 0.05 < eps <= total + 1.0  # calibrated on top of the history


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_search_does_not_warn_about_its_trial_points(accountant):
    with warnings.catch_warnings():  # Opacus warns on the search's large trial noise levels
        warnings.simplefilter("error")
        sigma = calibrate_noise(8.0, 1 / 7600, 32 / 760, 475, accountant)
    assert compute_epsilon([(sigma, 32 / 760, 475)], 1 / 7600, accountant) <= 8.0


def test_resolve_delta_takes_the_target_or_the_default():
    assert resolve_delta(1e-7, 100) == 1e-7
    assert resolve_delta(0.0, 100) == default_delta(100) == 1e-5
    assert resolve_delta(None, 5000) == default_delta(5000) == pytest.approx(2e-6)
