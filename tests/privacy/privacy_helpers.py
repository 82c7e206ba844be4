"""Tiny models and a one-sample-at-a-time reference for the privacy tests (import as a module)."""

from __future__ import annotations

import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.utils import logging

from fedtrust.tasks.lm import CharLMTask

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_bert(num_labels: int = 3, vocab: int = 50, hidden: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def text_batch(
    b: int, t: int, vocab: int = 50, labels: int | None = 3, pad_rows: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token batch; the first `pad_rows` rows are padded (id 0, mask 0) after 60%."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(pad_rows):
        cut = max(1, int(0.6 * t)) - i
        ids[i, cut:] = 0
        mask[i, cut:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = torch.randint(0, labels, (b,), generator=g)
    return out


def loop_grads(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per-sample gradients the slow way: one backward per sample (frozen params skipped)."""
    b = next(iter(batch.values())).shape[0]
    out = []
    for i in range(b):
        model.zero_grad(set_to_none=True)
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(model, one) if loss_fn else model(**one).loss
        loss.backward()
        out.append(
            {
                n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
    model.zero_grad(set_to_none=True)
    return out


def flat_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))


def row_loader(batch: dict[str, torch.Tensor], batch_size: int, **kw: Any) -> DataLoader:
    """A DataLoader over the rows of a collated batch (dict rows, dict batches)."""
    n = next(iter(batch.values())).shape[0]
    rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def collate(rs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([r[k] for r in rs]) for k in rs[0]}

    return DataLoader(rows, batch_size=batch_size, collate_fn=collate, **kw)


class Regressor(nn.Module):
    """Linear regression with a mean-reduced loss; batches are dicts {"x", "y"}."""

    def __init__(self, d_in: int = 6, d_out: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=(self.lin(x) - y).pow(2).sum(-1).mean())


def regression_batch(n: int, d_in: int = 6, d_out: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return {
        "x": x * torch.linspace(0.2, 3.0, n, dtype=torch.float64)[:, None],
        "y": torch.randn(n, d_out, generator=g, dtype=torch.float64),
    }


def tiny_char_lm_task():
    """fedtrust's character-level LM task on a 10-character vocabulary, one small GPT-2 layer."""
    return CharLMTask(
        kind="lm",
        train=[],
        test=[],
        pad_id=0,
        primary_metric="accuracy",
        vocab="abcdefghij",
        context=16,
        layers=1,
        width=16,
        heads=2,
    )
