"""Local training on one device: a short, plain PyTorch loop, optionally with eDP-SGD."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedtrust.privacy.attacks.one_run import GradientCanaries
from fedtrust.privacy.noise import REPRODUCIBLE_NOISE_WARNING
from fedtrust.tasks import Task


def make_optimizer(
    model: nn.Module, cfg, head_prefixes: tuple[str, ...] = ()
) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters (a ClientConfig names which).

    Parameters under `head_prefixes` (a freshly initialised classifier) learn `cfg.head_lr_scale`
    times faster than the pretrained body.
    """
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if head_prefixes and name.startswith(head_prefixes) else body).append(param)
    groups = [{"params": body, "lr": cfg.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.lr * cfg.head_lr_scale})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
    cfg,
    seed: int,
    dp: LocalDP | None = None,
) -> LocalResult:
    """`cfg.epochs` passes over `rows` (or exactly `cfg.steps` steps).

    With `dp`, batches are Poisson-sampled and every step is clipped and noised by fedtrust's
    eDP-SGD engine; each sample's loss is its own (a per-row mean over its own tokens, summed
    over rows), so adding or removing a row never rescales the others' gradients.
    """
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, cfg, task.head_prefixes)
    model.train()
    result = LocalResult()
    if dp is None:
        rng = np.random.default_rng(seed)
        epochs = cfg.epochs if cfg.steps == 0 else 10**9
        batches = (b for _ in range(epochs) for b in task.batches(rows, cfg.batch_size, rng))
        _loop(model, optimizer, batches, cfg.steps, lambda b: model(**b).loss, "mean", result)
        return result
    _train_private(model, optimizer, task, rows, cfg, seed, dp, result)
    return result


def _loop(model, optimizer, batches, max_steps: int, loss_of, reduction: str, result) -> None:
    """Train on `batches`; `result` holds the loss and steps so far even if a step raises."""
    loss_sum, seen = 0.0, 0
    for batch in batches:
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n = len(batch["input_ids"])
        loss_sum += loss.detach().item() * (n if reduction == "mean" else 1)
        seen += n
        result.steps += 1
        result.train_loss = loss_sum / max(seen, 1)
        if result.steps == max_steps:
            break


def sample_rate(num_rows: int, batch_size: int) -> float:
    """The Poisson sampling rate of local DP-SGD: one expected batch of `batch_size` rows."""
    return 1 / math.ceil(num_rows / min(batch_size, num_rows))


def _train_private(model, optimizer, task, rows, cfg, seed, dp: LocalDP, result) -> None:
    from fedtrust.privacy import PrivacyBudgetExhausted, PrivacyEngine

    generator = torch.Generator().manual_seed(seed) if dp.reproducible else None
    loader = DataLoader(
        rows, batch_size=min(cfg.batch_size, len(rows)), shuffle=True, collate_fn=task.collate
    )
    steps_now = cfg.steps or cfg.epochs * len(loader)
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
    epochs = cfg.epochs if cfg.steps == 0 else 10**9
    batches = (b for _ in range(epochs) for b in loader)
    if dp.canaries is not None:
        dp.canaries.attach(optimizer)
    try:
        _loop(
            model,
            optimizer,
            batches,
            cfg.steps,
            lambda b: task.sample_losses(model, b).sum(),
            "sum",
            result,
        )
    except PrivacyBudgetExhausted:
        result.budget_exhausted = True
    finally:
        engine.detach()
        if dp.canaries is not None:
            dp.canaries.detach()
    result.epsilon = engine.get_epsilon(dp.delta)
    result.noise_multiplier = float(engine.noise_multiplier or 0.0)
    if engine.steps:  # one participation: one noise level, one sample rate
        result.spent = [(result.noise_multiplier, float(engine.sample_rate), engine.steps)]
