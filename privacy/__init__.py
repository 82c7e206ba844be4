"""fedtrust.privacy: eDP-SGD, DP-SGD with batched per-sample clipping close to non-private speed.

Three lines::

    from fedtrust.privacy import PrivacyEngine
    engine = PrivacyEngine()  # dp-accounting PLD accountant, add/remove neighbours
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, target_epsilon=8.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0)

The training loop stays ``loss = model(**batch).loss; loss.backward(); optimizer.step();
optimizer.zero_grad()``.
"""

from .accounting import (
    RELATIONS,
    calibrate_noise,
    compute_epsilon,
    default_delta,
    device_epsilon,
    max_steps,
)
from .aggregation import add_gaussian_noise, clip_and_noise, clip_update, noisy_mean, update_norm
from .clipping import clip_factors, clipped_sum, per_sample_norms
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
from .grad_sample import PerSampleHooks
from .noise import fresh_generator
from .optimizer import DPOptimizer

__all__ = [
    "BudgetTooSmallError",
    "DPDataLoader",
    "DPOptimizer",
    "InvalidPrivacyParameterError",
    "PerSampleHooks",
    "PrivacyBudgetExhausted",
    "PrivacyEngine",
    "PrivacyError",
    "PrivacySpent",
    "RELATIONS",
    "UnsupportedModuleError",
    "add_gaussian_noise",
    "calibrate_noise",
    "clip_and_noise",
    "clip_factors",
    "clip_update",
    "clipped_sum",
    "compute_epsilon",
    "default_delta",
    "device_epsilon",
    "fresh_generator",
    "max_steps",
    "noisy_mean",
    "per_sample_gradients",
    "per_sample_norms",
    "poisson_loader",
    "update_norm",
]
