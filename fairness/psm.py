"""Protected-status models (PSMs) and the small training loop the fairness audits share.

When the user gives no PSM, `train_psm` makes one that fits the task classifier (TC) by
construction: a copy of the TC's encoder (same tokenizer, same embeddings, which stay frozen)
with a fresh 2-class head, fine-tuned for a few hundred steps to tell the gender of EEC sentences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from .eec import EECSentence

HEAD_PREFIXES = ("classifier.", "score.", "pre_classifier.")
GENDER_LABELS = ("male", "female")


def freeze_lower(model: nn.Module, layers: int) -> None:
    """Freeze the word/position embeddings and the lowest `layers` encoder layers."""
    base = model.base_model_prefix
    prefixes = [f"{base}.embeddings."] + [f"{base}.encoder.layer.{i}." for i in range(layers)]
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(False)


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

    Parameters whose names start with a head prefix learn at `head_lr`, the rest at `lr`;
    frozen parameters (requires_grad False) stay as they are. Returns the last steps' mean loss.
    """
    if len(texts) != len(labels) or not texts:
        raise ValueError(
            f"fine_tune needs texts and labels of one non-zero length, got "
            f"{len(texts)} and {len(labels)}"
        )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if n.startswith(HEAD_PREFIXES)]
    body = [p for n, p in trainable if not n.startswith(HEAD_PREFIXES)]
    groups = [
        g for g in ({"params": body, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    y = torch.tensor(list(labels), dtype=torch.long)
    order: list[int] = []
    losses: list[float] = []
    model.train()
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
        loss = model(**enc, labels=y[idx]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return {"train_loss": float(np.mean(losses[-20:]))}


def copy_encoder(tc_model: nn.Module, num_labels: int = 2, seed: int = 0) -> nn.Module:
    """A new sequence classifier with the TC's architecture and encoder weights, fresh head."""
    config = type(tc_model.config).from_dict(tc_model.config.to_dict())
    config.num_labels = num_labels
    config.id2label = dict(enumerate(GENDER_LABELS[:num_labels]))
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    own = model.state_dict()
    state = {
        k: v
        for k, v in tc_model.state_dict().items()
        if not k.startswith(HEAD_PREFIXES) and k in own and own[k].shape == v.shape
    }
    model.load_state_dict(state, strict=False)
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
    freeze_lower(model, freeze_layers)
    info = fine_tune(model, tokenizer, texts, genders, steps, batch_size, lr, head_lr, seed)
    return model, info


@torch.no_grad()
def accuracy(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int]
) -> float:
    """Share of texts whose predicted class is the label."""
    from .sensitivity import predict_proba

    pred = predict_proba(model, tokenizer, texts).argmax(-1)
    return float(np.mean(pred == np.asarray(labels)))
