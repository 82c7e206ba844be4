"""Per-example loss and LiRA confidence of a model: the raw signal of membership inference."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

IGNORE = -100


class ScoredTask(Protocol):
    """What scoring needs of a task (`fedtrust.tasks.Task` has it): its kind ("lm" scores every
    predicted token) and how it collates rows into a batch with `labels`."""

    kind: str

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]: ...


@torch.no_grad()
def example_scores(
    model: nn.Module, task: ScoredTask, rows: list[dict[str, Any]], batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Per-example `loss` and `confidence` of `model` on `rows`, in the order of `rows`.

    `loss` is the cross-entropy of the true label; `confidence` is LiRA's logit-scaled
    confidence log(p_y) - log(1 - p_y) (Carlini et al. 2022), computed from the logits without
    ever forming 1 - p_y. For a language model (`task.kind == "lm"`) both are means over the
    example's predicted tokens (padding / label -100 ignored). The model is scored in eval mode
    and left in the mode it came in.
    """
    if not rows:
        raise ValueError("example_scores needs at least one row")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # score length-sorted batches (little padding) and write results back to each row's index
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    loss = np.empty(len(rows))
    conf = np.empty(len(rows))
    try:
        for start in range(0, len(rows), batch_size):
            idx = order[start : start + batch_size]
            batch = task.collate([rows[i] for i in idx])
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.double()
            labels = batch["labels"].to(device)
            if task.kind == "lm":  # position t predicts token t + 1
                logits, labels = logits[:, :-1], labels[:, 1:]
            else:
                labels = labels[:, None]
                logits = logits[:, None]
            token_loss, token_conf = _token_scores(logits, labels)
            keep = labels != IGNORE
            count = keep.sum(-1)
            if bool((count == 0).any()):
                bad = int(idx[int((count == 0).nonzero()[0])])
                raise ValueError(f"row {bad} has no predicted token (too short to score)")
            loss[idx] = ((token_loss * keep).sum(-1) / count).cpu().numpy()
            conf[idx] = ((token_conf * keep).sum(-1) / count).cpu().numpy()
    finally:
        model.train(was_training)
    return {"loss": loss, "confidence": conf}


def _token_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and logit-scaled confidence per position (garbage where label is -100)."""
    gold = labels.clamp(min=0).unsqueeze(-1)
    z_y = logits.gather(-1, gold).squeeze(-1)
    loss = torch.logsumexp(logits, -1) - z_y  # -log p_y
    others = logits.scatter(-1, gold, float("-inf"))
    conf = z_y - torch.logsumexp(others, -1)  # log p_y - log(1 - p_y)
    return loss, conf
