"""The one training loop every fedtrust model uses: devices, the PSM, distillation, the audit.

nanoGPT-style: an optimizer with two learning rates (a freshly initialised head learns faster
than a pretrained body) and a plain loop over batches. DP training passes the same loop a
per-sample loss and a private optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .models import HEAD_PREFIXES


def make_optimizer(
    model: nn.Module,
    lr: float,
    *,
    head_lr: float | None = None,
    head_prefixes: tuple[str, ...] = HEAD_PREFIXES,
    kind: Literal["adamw", "sgd"] = "adamw",
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; those under `head_prefixes` learn at
    `head_lr` (default: `lr`). Frozen parameters (requires_grad False) are left out."""
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if head_prefixes and name.startswith(head_prefixes) else body).append(param)
    groups = [{"params": body, "lr": lr}]
    if head:
        groups.append({"params": head, "lr": lr if head_lr is None else head_lr})
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


@dataclass
class TrainProgress:
    """Steps taken and the mean loss so far; kept up to date after every step, so a loop that
    stops early (an exhausted privacy budget) still reports what it did."""

    steps: int = 0
    examples: int = 0
    loss_sum: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.examples if self.examples else float("nan")


def train_steps(
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, Any]],
    loss_of: Callable[[dict[str, Any]], torch.Tensor],
    *,
    max_steps: int = 0,
    reduction: Literal["mean", "sum"] = "mean",
    scheduler: Any = None,
    progress: TrainProgress | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> TrainProgress:
    """One optimizer step per batch (at most `max_steps` when > 0).

    `loss_of(batch)` returns the batch loss, a mean over its rows (`reduction="mean"`) or a sum
    (`"sum"`, what DP-SGD's per-sample clipping needs); the progress holds the per-row mean.
    `penalty()`: a regulariser added to every step's objective (e.g. EWC's pull towards an
    anchor); the progress reports the data loss without it. Pass `progress` to read it even
    when a step raises. `after_step(steps_done)` runs after every optimizer step (e.g. a learned
    diff's projection, `fedtrust.compression`).
    """
    progress = progress if progress is not None else TrainProgress()
    for batch in batches:
        loss = loss_of(batch)
        (loss if penalty is None else loss + penalty()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        rows = _rows(batch)
        progress.loss_sum += loss.detach().item() * (rows if reduction == "mean" else 1)
        progress.examples += rows
        progress.steps += 1
        if after_step is not None:
            after_step(progress.steps)
        if progress.steps == max_steps:
            break
    return progress


def _rows(batch: dict[str, Any]) -> int:
    first = batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))
    return len(first)
