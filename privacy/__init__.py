"""fedtrust.privacy: eDP-SGD, DP-SGD with batched per-sample clipping close to non-private speed.

Three lines::

    from fedtrust.privacy import PrivacyEngine
    engine = PrivacyEngine()  # dp-accounting PLD accountant, add/remove neighbours
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, target_epsilon=8.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0)

The training loop stays ``loss = model(**batch).loss; loss.backward(); optimizer.step();
optimizer.zero_grad()``.

This module exports what a user calls; the machinery (per-sample hooks, clipping, noise source)
stays importable from its own module (`fedtrust.privacy.grad_sample`, `.clipping`, `.noise`),
and the privacy attacks live in `fedtrust.privacy.attacks`.
"""

from .accounting import (
    RELATIONS,
    calibrate_noise,
    compute_epsilon,
    default_delta,
    device_epsilon,
    max_steps,
    resolve_delta,
)
from .data import DPDataLoader, poisson_loader
from .engine import PrivacyEngine, PrivacySpent
from .errors import (
    BudgetTooSmallError,
    InvalidPrivacyParameterError,
    PrivacyBudgetExhausted,
    PrivacyError,
    UnsupportedModuleError,
)
from .functional import per_sample_gradients
from .optimizer import DPOptimizer

__all__ = [
    "BudgetTooSmallError",
    "DPDataLoader",
    "DPOptimizer",
    "InvalidPrivacyParameterError",
    "PrivacyBudgetExhausted",
    "PrivacyEngine",
    "PrivacyError",
    "PrivacySpent",
    "RELATIONS",
    "UnsupportedModuleError",
    "calibrate_noise",
    "compute_epsilon",
    "default_delta",
    "device_epsilon",
    "max_steps",
    "per_sample_gradients",
    "poisson_loader",
    "resolve_delta",
]
