"""`PrivacyEngine`: three lines turn a model/optimizer/loader into eDP-SGD training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from . import accounting
from .clipping import CLIPPING_MODES
from .data import DPDataLoader, poisson_loader
from .errors import BudgetTooSmallError, InvalidPrivacyParameterError, PrivacyBudgetExhausted
from .grad_sample import PerSampleHooks
from .optimizer import DPOptimizer


@dataclass(frozen=True)
class PrivacySpent:
    """What a device reports after local training."""

    epsilon: float
    delta: float
    steps: int
    noise_multiplier: float
    sample_rate: float
    accountant: str
    relation: str


class PrivacyEngine:
    """DP-SGD with batched per-sample clipping (ghost norms + book-keeping) and PLD accounting.

    Example::

        engine = PrivacyEngine()  # accountant="pld", relation="add-remove"
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            target_epsilon=8.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0)

    `history` (Opacus ``(noise_multiplier, sample_rate, steps)`` tuples, e.g. from a previous
    federated round's `state_dict`) is carried into ε and into noise calibration. `relation`
    ("add-remove" or "replace-one", the latter with accountant="pld" only) is the neighbouring
    relation every ε and every calibration is computed under.
    """

    def __init__(
        self,
        accountant: str = "pld",
        history: list[tuple[float, float, int]] | None = None,
        relation: str = "add-remove",
    ) -> None:
        self.accountant = accounting.make_accountant(accountant, history or [], relation)
        self.mechanism = accountant
        self.relation = relation
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.max_grad_norm: float | None = None
        self.target_epsilon: float | None = None
        self.target_delta: float | None = None
        self.steps = 0
        self._hooks: PerSampleHooks | None = None
        self._prior: list[tuple[float, float, int]] = []
        self._safe_steps = 0
        self._searched = False

    # -- setup -----------------------------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        epochs: float | None = None,
        steps: int | None = None,
        clipping: str = "flat",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        loss_reduction: str = "mean",
        noise_generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, DPOptimizer, DPDataLoader]:
        """Attach DP-SGD to `module` (in place) and return (module, DP optimizer, DP loader).

        Give `noise_multiplier`, or `target_epsilon`/`target_delta` with `epochs` or `steps` to
        calibrate it. With a target, `optimizer.step()` raises `PrivacyBudgetExhausted` before
        any step that would exceed it (also when a `noise_multiplier` is given).
        """
        n = len(data_loader.dataset)  # type: ignore[arg-type]
        if n == 0:
            raise InvalidPrivacyParameterError("the data loader's dataset is empty")
        if not max_grad_norm > 0:
            raise InvalidPrivacyParameterError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if clipping not in CLIPPING_MODES:
            raise InvalidPrivacyParameterError(
                f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}"
            )
        if loss_reduction not in ("mean", "sum"):
            raise InvalidPrivacyParameterError(
                f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        accounting.check_epsilon_delta(target_epsilon, target_delta, n)
        if noise_multiplier is None and target_epsilon is None:
            raise InvalidPrivacyParameterError(
                "give noise_multiplier, or target_epsilon and target_delta with epochs or steps"
            )
        if noise_multiplier is not None and not noise_multiplier >= 0:
            raise InvalidPrivacyParameterError(
                f"noise_multiplier must be >= 0, got {noise_multiplier}"
            )
        if steps is not None and epochs is not None:
            raise InvalidPrivacyParameterError("give epochs or steps, not both")

        if poisson_sampling:
            loader = poisson_loader(data_loader, noise_generator)
            sample_rate = 1 / len(data_loader)
            expected = sample_rate * n
        else:
            loader = data_loader
            batch = data_loader.batch_size or n / len(data_loader)
            sample_rate, expected = batch / n, float(batch)
        prior = list(self.accountant.history)
        planned = (
            steps
            if steps is not None
            else (max(1, round(epochs / sample_rate)) if epochs is not None else None)
        )
        if noise_multiplier is None:
            if planned is None:
                raise InvalidPrivacyParameterError(
                    "calibrating noise to target_epsilon needs epochs or steps"
                )
            assert target_epsilon is not None and target_delta is not None
            noise_multiplier = accounting.calibrate_noise(
                target_epsilon,
                target_delta,
                sample_rate,
                planned,
                self.mechanism,
                prior,
                relation=self.relation,
            )
            safe = planned
        else:
            safe = 0
            if target_epsilon is not None:
                assert target_delta is not None
                one = accounting.compute_epsilon(
                    prior + [(noise_multiplier, sample_rate, 1)],
                    target_delta,
                    self.mechanism,
                    self.relation,
                )
                if one > target_epsilon:
                    raise BudgetTooSmallError(
                        f"one step at noise_multiplier={noise_multiplier} already spends "
                        f"epsilon={one:.4g} > target {target_epsilon}; raise the noise or budget"
                    )
                safe = 1

        if self._hooks is not None:  # one engine drives one model at a time
            self._hooks.detach()
        hooks = PerSampleHooks(module)
        self._hooks = hooks
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate, self.expected_batch_size = sample_rate, expected
        self.max_grad_norm = float(max_grad_norm)
        self.target_epsilon, self.target_delta = target_epsilon, target_delta
        self.steps, self._prior, self._safe_steps, self._searched = 0, prior, safe, False
        dp_optimizer = DPOptimizer(
            optimizer,
            hooks=hooks,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected,
            clipping=clipping,
            loss_reduction=loss_reduction,
            generator=noise_generator,
            before_step=self._check_budget,
            after_step=self._account_step,
        )
        dp_loader = DPDataLoader(loader, dp_optimizer, max_physical_batch_size, sample_rate)
        return module, dp_optimizer, dp_loader

    def detach(self) -> None:
        """Remove the hooks from the model (it trains non-privately again)."""
        if self._hooks is not None:
            self._hooks.detach()
            self._hooks = None

    # -- accounting ------------------------------------------------------------------------------
    def _account_step(self) -> None:
        assert self.noise_multiplier is not None and self.sample_rate is not None
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps += 1

    def _allowed_steps(self) -> int:
        if self.steps + 1 > self._safe_steps and not self._searched:
            assert self.target_epsilon is not None and self.target_delta is not None
            assert self.noise_multiplier is not None and self.sample_rate is not None
            self._safe_steps = accounting.max_steps(
                self._prior,
                self.noise_multiplier,
                self.sample_rate,
                self.target_delta,
                self.target_epsilon,
                self.mechanism,
                known_safe=self._safe_steps,
                relation=self.relation,
            )
            self._searched = True
        return self._safe_steps

    @property
    def budget_exhausted(self) -> bool:
        """True when a target ε is set and one more step would exceed it."""
        if self.target_epsilon is None:
            return False
        return self.steps + 1 > self._allowed_steps()

    def _check_budget(self) -> None:
        if self.budget_exhausted:
            assert self.target_epsilon is not None and self.target_delta is not None
            raise PrivacyBudgetExhausted(
                self.get_epsilon(self.target_delta), self.target_epsilon, self.target_delta
            )

    def get_epsilon(self, delta: float | None = None) -> float:
        """ε spent so far (all history, previous rounds included) at `delta` (default: target)."""
        delta = self.target_delta if delta is None else delta
        if delta is None:
            raise InvalidPrivacyParameterError("give delta: no target_delta was set")
        return accounting.compute_epsilon(
            self.accountant.history, delta, self.mechanism, self.relation
        )

    def privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        """ε, δ, steps and mechanism parameters: what a federated device reports."""
        d = self.target_delta if delta is None else delta
        eps = self.get_epsilon(d)
        return PrivacySpent(
            eps,
            float(d),
            sum(s for _, _, s in self.accountant.history),
            self.noise_multiplier or 0.0,
            self.sample_rate or 0.0,
            self.mechanism,
            self.relation,
        )

    def state_dict(self) -> dict[str, Any]:
        """The accountant's state (history, mechanism, relation), to persist between rounds."""
        return {**self.accountant.state_dict(), "relation": self.relation}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accountant's state saved by `state_dict`."""
        self.accountant.load_state_dict(state)
