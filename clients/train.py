"""Local training on one device: a short, plain PyTorch loop, optionally with eDP-SGD.

Also what loss-aware fairness mitigations ask of a device (never under DP): the received global
model's loss on its rows (`global_model_loss`), its diagonal empirical Fisher
(`fisher_diagonal`) and the EWC penalty that anchors fine-tuning to it (`EWCPenalty`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedtrust.privacy import PrivacyBudgetExhausted, PrivacyEngine
from fedtrust.privacy.attacks.one_run import GradientCanaries
from fedtrust.privacy.noise import REPRODUCIBLE_NOISE_WARNING
from fedtrust.tasks import Task
from fedtrust.tasks.training import TrainProgress, make_optimizer, train_steps

from .settings import ClientSettings


@dataclass
class LocalDP:
    """Sample-level DP for one participation of one device.

    `reproducible`: noise and Poisson batches from the training seed (replayable by anyone who
    knows it); otherwise both come from OS entropy. `history` is the device's own record of
    what it released before (its accountant history).
    """

    max_grad_norm: float
    delta: float
    target_epsilon: float = 0.0  # > 0: noise calibrated so the planned participations fit
    noise_multiplier: float = 0.0
    participations_left: int = 1  # this one included
    clipping: str = "flat"
    accountant: str = "pld"
    relation: str = "replace-one"
    reproducible: bool = False
    history: list[tuple[float, float, int]] = field(default_factory=list)
    canaries: GradientCanaries | None = None  # the one-run audit's white-box canaries

    def guarantee(self) -> dict[str, Any]:
        """What an ε of this training means: δ, neighbouring relation, accountant, noise."""
        out: dict[str, Any] = {
            "delta": self.delta,
            "relation": f"{self.relation} example",
            "accountant": self.accountant,
        }
        if self.reproducible:
            out["noise"] = REPRODUCIBLE_NOISE_WARNING
        return out


@dataclass
class LocalResult:
    """What local training did; under DP, `spent` holds this participation's releases."""

    train_loss: float = float("nan")
    steps: int = 0
    epsilon: float = 0.0
    noise_multiplier: float = 0.0
    spent: list[tuple[float, float, int]] = field(default_factory=list)
    budget_exhausted: bool = False


def train_local(
    model: nn.Module,
    task: Task,
    rows: list[dict[str, Any]],
    settings: ClientSettings,
    seed: int,
    dp: LocalDP | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    before_step: Callable[[], None] | None = None,
) -> LocalResult:
    """`settings.epochs` passes over `rows` (or exactly `settings.steps` steps).

    With `dp`, batches are Poisson-sampled and every step is clipped and noised by fedtrust's
    eDP-SGD engine; each sample's loss is its own (a per-row mean over its own tokens, summed
    over rows), so adding or removing a row never rescales the others' gradients.
    `penalty(model)` is added to every step's loss (not under DP: it would not be clipped); the
    reported train loss is the data loss. `before_step()` runs just before every optimizer
    step (under DP, after the noise), `after_step(steps_done)` after it: both see only what DP
    released (post-processing); a learned diff's projections (`fedtrust.compression`).
    """
    if dp is not None and penalty is not None:
        raise ValueError("a loss penalty is not clipped per sample: not under DP")
    torch.manual_seed(seed)
    optimizer = make_optimizer(
        model,
        settings.lr,
        head_lr=settings.lr * settings.head_lr_scale,
        head_prefixes=task.head_prefixes,
        kind=settings.optimizer,
        weight_decay=settings.weight_decay,
    )
    if before_step is not None:  # on the inner optimizer: under DP it steps after the noise
        optimizer.register_step_pre_hook(lambda *_: before_step())
    model.train()
    if dp is None:
        rng = np.random.default_rng(seed)
        epochs = settings.epochs if settings.steps == 0 else 10**9
        device = _device_of(model)
        batches = (
            to_device(b, device)
            for _ in range(epochs)
            for b in task.batches(rows, settings.batch_size, rng)
        )
        done = train_steps(
            optimizer,
            batches,
            lambda b: model(**b).loss,
            max_steps=settings.steps,
            penalty=None if penalty is None else lambda: penalty(model),
            after_step=after_step,
        )
        return LocalResult(train_loss=done.mean_loss, steps=done.steps)
    return _train_private(model, optimizer, task, rows, settings, seed, dp, after_step)


@torch.no_grad()
def global_model_loss(
    model: nn.Module, task: Task, rows: list[dict[str, Any]], batch_size: int
) -> float:
    """The model's mean per-row loss over `rows` (`task.sample_losses`, every row once, in eval
    mode: no dropout), NaN without rows."""
    model.eval()
    device = _device_of(model)
    total = sum(
        float(task.sample_losses(model, to_device(b, device)).sum())
        for b in task.batches(rows, batch_size)
    )
    return total / len(rows) if rows else float("nan")


def fisher_diagonal(
    model: nn.Module, task: Task, rows: list[dict[str, Any]], batch_size: int
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of the trainable parameters at the model as it is.

    F_j = mean over the mini-batches b (length-sorted, `batch_size` rows, in eval mode) of
    (d mean_{i in b} loss_i / d theta_j)^2, with loss_i = `task.sample_losses`. The exact
    empirical Fisher is the mean over rows of each row's squared gradient; squaring batch-mean
    gradients is the cheap approximation FedCurv-style methods use: it keeps the squared mean
    gradient and divides the rows' gradient variance by the batch size, so it is smaller the
    larger the batches (batch_size = 1 gives the exact empirical Fisher). Leaves no gradients.
    """
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    batches, device = 0, _device_of(model)
    for batch in task.batches(rows, batch_size):
        loss = task.sample_losses(model, to_device(batch, device)).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                fisher[name] += grad.detach() ** 2
        batches += 1
    return {n: f / max(batches, 1) for n, f in fisher.items()}


@dataclass
class EWCPenalty:
    """ewc_lambda / 2 * sum_j F_j (theta_j - anchor_j)^2 over the parameters `fisher` names:
    moving a parameter the population's fit depends on (high F_j) away from the global model
    `anchor` costs more."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    ewc_lambda: float

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = sum((f * (params[n] - self.anchor[n]) ** 2).sum() for n, f in self.fisher.items())
        return self.ewc_lambda / 2 * total


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors on `device` (the model's); other values as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_rate(num_rows: int, batch_size: int) -> float:
    """The Poisson sampling rate of local DP-SGD: one expected batch of `batch_size` rows."""
    return 1 / math.ceil(num_rows / min(batch_size, num_rows))


def _train_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    rows: list[dict[str, Any]],
    settings: ClientSettings,
    seed: int,
    dp: LocalDP,
    after_step: Callable[[int], None] | None,
) -> LocalResult:
    device = _device_of(model)
    generator = torch.Generator().manual_seed(seed) if dp.reproducible else None
    loader = DataLoader(
        rows, batch_size=min(settings.batch_size, len(rows)), shuffle=True, collate_fn=task.collate
    )
    steps_now = settings.steps or settings.epochs * len(loader)
    engine = PrivacyEngine(accountant=dp.accountant, history=dp.history, relation=dp.relation)
    budget: dict[str, Any] = {"noise_multiplier": dp.noise_multiplier or None}
    if dp.target_epsilon > 0:
        budget.update(
            target_epsilon=dp.target_epsilon,
            target_delta=dp.delta,
            steps=steps_now * max(dp.participations_left, 1),
        )
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        max_grad_norm=dp.max_grad_norm,
        clipping=dp.clipping,
        loss_reduction="sum",
        noise_generator=generator,
        **budget,
    )
    epochs = settings.epochs if settings.steps == 0 else 10**9
    batches = (b for _ in range(epochs) for b in loader)
    if dp.canaries is not None:
        dp.canaries.attach(optimizer)
    # The steps done before an exhausted budget stopped the loop still count: `progress`
    # is updated after every step, whatever ends the loop.
    progress = TrainProgress()
    exhausted = False
    try:
        train_steps(
            optimizer,
            batches,
            lambda b: task.sample_losses(model, to_device(b, device)).sum(),
            max_steps=settings.steps,
            reduction="sum",
            progress=progress,
            after_step=after_step,
        )
    except PrivacyBudgetExhausted:
        exhausted = True
    finally:
        engine.detach()
        if dp.canaries is not None:
            dp.canaries.detach()
    noise = float(engine.noise_multiplier or 0.0)
    return LocalResult(
        train_loss=progress.mean_loss,
        steps=progress.steps,
        epsilon=engine.get_epsilon(dp.delta),
        noise_multiplier=noise,
        # one participation: one noise level, one sample rate
        spent=[(noise, float(engine.sample_rate), engine.steps)] if engine.steps else [],
        budget_exhausted=exhausted,
    )
