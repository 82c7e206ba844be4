"""Exceptions raised by fedtrust.privacy, each with a one-line message saying what to do.

Their base is `fedtrust.errors.PrivacyError` (a `FedtrustError`), so the CLI prints them as one
line like every other bad-input error.
"""

from __future__ import annotations

from fedtrust.errors import PrivacyError

__all__ = [
    "BudgetTooSmallError",
    "InvalidPrivacyParameterError",
    "PrivacyBudgetExhausted",
    "PrivacyError",
    "UnsupportedModuleError",
]


class InvalidPrivacyParameterError(PrivacyError, ValueError):
    """A privacy parameter (epsilon, delta, noise multiplier, clip norm, ...) is out of range."""


class BudgetTooSmallError(PrivacyError, ValueError):
    """The (epsilon, delta) budget does not allow even one training step."""


class UnsupportedModuleError(PrivacyError, TypeError):
    """A trainable module whose per-sample gradient cannot be computed."""

    def __init__(self, path: str, module_class: str, reason: str) -> None:
        self.path = path or "<root>"
        self.module_class = module_class
        super().__init__(f"module '{self.path}' ({module_class}): {reason}")


class PrivacyBudgetExhausted(PrivacyError, RuntimeError):
    """The next optimizer step would spend more than the target epsilon; nothing was changed."""

    def __init__(self, epsilon_spent: float, target_epsilon: float, delta: float) -> None:
        self.epsilon_spent = epsilon_spent
        self.target_epsilon = target_epsilon
        self.delta = delta
        super().__init__(
            f"privacy budget exhausted: epsilon spent {epsilon_spent:.4g}, one more step would "
            f"exceed target {target_epsilon:.4g} (delta={delta:.3g}); checkpoint and stop"
        )
