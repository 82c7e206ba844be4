"""Protected-status models (PSMs) and the fine-tuning the fairness audits share.

When the user gives no PSM, `train_psm` makes one that fits the task classifier (TC) by
construction: a copy of the TC's encoder (same tokenizer, same embeddings, which stay frozen)
with a fresh 2-class head, fine-tuned for a few hundred steps to tell the gender of EEC sentences.
Training is fedtrust's one loop (`fedtrust.tasks.training`): AdamW with the body at `lr` and the
parameters a pretrained encoder does not bring (`fedtrust.tasks.models.HEAD_PREFIXES`: the new
classifier head and BERT's pooler) at `head_lr`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from fedtrust.errors import FairnessError
from fedtrust.tasks.base import freeze_lower
from fedtrust.tasks.training import make_optimizer, train_steps

from .eec import EECSentence
from .sensitivity import predict_proba

GENDER_LABELS = ("male", "female")
LOSS_WINDOW = 20  # fine_tune reports the mean loss of this many last steps


def fine_tune(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    seed: int = 0,
    max_length: int = 64,
) -> dict[str, float]:
    """Train a sequence classifier in place: AdamW, shuffled epochs, `steps` updates.

    Parameters under `HEAD_PREFIXES` learn at `head_lr`, the rest at `lr`; frozen parameters
    (requires_grad False) stay as they are. Returns the last steps' mean loss.
    """
    if len(texts) != len(labels) or not texts:
        raise FairnessError(
            f"fine_tune needs texts and labels of one non-zero length, got "
            f"{len(texts)} and {len(labels)}"
        )
    optimizer = make_optimizer(model, lr, head_lr=head_lr)
    torch.manual_seed(seed)
    losses: list[float] = []

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = model(**batch).loss
        losses.append(loss.item())
        return loss

    batches = _shuffled_batches(
        tokenizer, texts, labels, steps, batch_size, max_length, np.random.default_rng(seed)
    )
    model.zero_grad(set_to_none=True)
    model.train()
    train_steps(optimizer, batches, loss_of, max_steps=steps)
    model.eval()
    return {"train_loss": float(np.mean(losses[-LOSS_WINDOW:]))}


def _shuffled_batches(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    steps: int,
    batch_size: int,
    max_length: int,
    rng: np.random.Generator,
) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` tokenised batches from shuffled epochs (a batch may span two epochs)."""
    y = torch.tensor(list(labels), dtype=torch.long)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.permutation(len(texts)).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        enc = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {**enc, "labels": y[idx]}


def copy_encoder(tc_model: nn.Module, num_labels: int = 2, seed: int = 0) -> nn.Module:
    """A new sequence classifier with the TC's architecture and encoder weights, fresh head.

    Everything under the TC's base model is copied (embeddings, layers and, for BERT, the pooler,
    which the TC trained along with its head); only the classification head is new.
    """
    config = type(tc_model.config).from_dict(tc_model.config.to_dict())
    config.num_labels = num_labels
    config.id2label = dict(enumerate(GENDER_LABELS[:num_labels]))
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(tc_model.base_model.state_dict())
    return model


def gender_data(rows: Sequence[EECSentence]) -> tuple[list[str], list[int]]:
    """EEC sentences and their gender as 0 (male) / 1 (female)."""
    return [r.sentence for r in rows], [GENDER_LABELS.index(r.gender) for r in rows]


def train_psm(
    tc_model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    genders: Sequence[int],
    steps: int = 300,
    batch_size: int = 32,
    freeze_layers: int = 0,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, float]]:
    """Train a PSM for `tc_model`: its encoder copied, embeddings frozen, a 2-class gender head.

    `freeze_layers` also freezes the lowest encoder layers (faster on CPU). Returns the model
    (in eval mode) and {"train_loss"}.
    """
    model = copy_encoder(tc_model, num_labels=2, seed=seed)
    freeze_lower(model, embeddings=True, layers=freeze_layers)
    info = fine_tune(model, tokenizer, texts, genders, steps, batch_size, lr, head_lr, seed)
    return model, info


def accuracy(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int]
) -> float:
    """Share of texts whose predicted class is the label."""
    pred = predict_proba(model, tokenizer, texts).argmax(-1)
    return float(np.mean(pred == np.asarray(labels)))
