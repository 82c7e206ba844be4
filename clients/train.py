"""Local training on one device: a short, plain PyTorch loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from fedtrust.tasks import Task
from torch import nn


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
            (head if name.startswith(head_prefixes) and head_prefixes else body).append(param)
    groups = [{"params": body, "lr": cfg.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.lr * cfg.head_lr_scale})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(
    model: nn.Module, task: Task, rows: list[dict[str, Any]], cfg, seed: int
) -> dict[str, float]:
    """`cfg.epochs` passes over `rows` (or exactly `cfg.steps` steps); returns training metrics."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = make_optimizer(model, cfg, task.head_prefixes)
    model.train()
    steps, loss_sum, seen = 0, 0.0, 0
    epochs = cfg.epochs if cfg.steps == 0 else 10**9
    for _ in range(epochs):
        for batch in task.batches(rows, cfg.batch_size, rng):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n = len(batch["input_ids"])
            loss_sum += loss.detach().item() * n
            seen += n
            steps += 1
            if steps == cfg.steps:
                break
        if steps == cfg.steps:
            break
    return {"train_loss": loss_sum / max(seen, 1), "steps": float(steps)}
