"""Local training on one device: a short, plain PyTorch loop, optionally with eDP-SGD."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

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
    """Sample-level DP for one participation of one device."""

    max_grad_norm: float
    delta: float
    target_epsilon: float = 0.0  # > 0: noise calibrated so the planned participations fit
    noise_multiplier: float = 0.0
    participations_left: int = 1  # this one included
    clipping: str = "flat"
    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)


def train_local(
    model: nn.Module,
    task: Task,
    rows: list[dict[str, Any]],
    cfg,
    seed: int,
    dp: LocalDP | None = None,
) -> dict[str, Any]:
    """`cfg.epochs` passes over `rows` (or exactly `cfg.steps` steps); returns training metrics.

    With `dp`, batches are Poisson-sampled and every step is clipped and noised by fedtrust's
    eDP-SGD engine; the metrics then include the device's cumulative `epsilon` and the updated
    accountant `history`.
    """
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, cfg, task.head_prefixes)
    model.train()
    if dp is None:
        rng = np.random.default_rng(seed)
        epochs = cfg.epochs if cfg.steps == 0 else 10**9
        batches = (b for _ in range(epochs) for b in task.batches(rows, cfg.batch_size, rng))
        return _loop(model, optimizer, batches, cfg.steps)
    return _train_private(model, optimizer, task, rows, cfg, seed, dp)


def _loop(model, optimizer, batches, max_steps: int) -> dict[str, Any]:
    steps, loss_sum, seen = 0, 0.0, 0
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n = len(batch["input_ids"])
        loss_sum += loss.detach().item() * n
        seen += n
        steps += 1
        if steps == max_steps:
            break
    return {"train_loss": loss_sum / max(seen, 1), "steps": float(steps)}


def _train_private(model, optimizer, task, rows, cfg, seed, dp: LocalDP) -> dict[str, Any]:
    from fedtrust.privacy import PrivacyBudgetExhausted, PrivacyEngine

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        rows,
        batch_size=min(cfg.batch_size, len(rows)),
        shuffle=True,
        collate_fn=task.collate,
        generator=generator,
    )
    steps_now = cfg.steps or cfg.epochs * len(loader)
    engine = PrivacyEngine(accountant=dp.accountant, history=dp.history)
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
        noise_generator=generator,
        **budget,
    )
    epochs = cfg.epochs if cfg.steps == 0 else 10**9
    result: dict[str, Any] = {"train_loss": float("nan"), "steps": 0.0}
    try:
        result = _loop(model, optimizer, (b for _ in range(epochs) for b in loader), cfg.steps)
    except PrivacyBudgetExhausted:
        result["budget_exhausted"] = True
    finally:
        engine.detach()
    result.update(
        epsilon=engine.get_epsilon(dp.delta),
        noise_multiplier=engine.noise_multiplier,
        history=[list(h) for h in engine.accountant.history],
    )
    return result
