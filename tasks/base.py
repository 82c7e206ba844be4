"""What every task gives fedtrust: encoded splits, a model builder, batching, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class Task:
    """A dataset + tokenizer + model + loss + metrics, as one object.

    `train`, `test` and `validation` hold encoded rows as plain lists (`input_ids`, `labels`,
    optional `device`); `validation` is empty when the data has no such split. The model
    computes its own loss from a batch (`model(**batch).loss`), so training loops stay
    task-agnostic.
    """

    kind: str
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    pad_id: int
    primary_metric: str
    info: dict[str, Any] = field(default_factory=dict)
    head_prefixes: tuple[str, ...] = ()  # freshly initialised parameters (may learn faster)
    validation: list[dict[str, Any]] = field(default_factory=list)

    def build_model(self, seed: int = 0) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of rows to the longest one (dynamic padding keeps sequences short)."""
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": self._labels(rows, ids, mask)}

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write the model in transformers' format (safetensors), loadable with from_pretrained."""
        model.save_pretrained(folder)

    def _labels(self, rows: list[dict], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per row, each depending on that row alone (what DP-SGD needs).

        The default is the cross-entropy of a classifier's logits against `labels`.
        """
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

    def batches(
        self,
        rows: list[dict[str, Any]],
        batch_size: int,
        rng: np.random.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches: shuffled with `rng`, else sorted by length (no wasted padding)."""
        if rng is not None:
            order = rng.permutation(len(rows))
        else:
            order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
        for start in range(0, len(order), batch_size):
            yield self.collate([rows[i] for i in order[start : start + batch_size]])

    def indexed_batches(
        self, rows: list[dict[str, Any]], batch_size: int
    ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """(row indices, collated batch), sorted by length: scatter results back by index."""
        order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk, self.collate([rows[i] for i in chunk])

    @torch.no_grad()
    def embed(
        self, model: nn.Module, rows: list[dict[str, Any]], batch_size: int = 256
    ) -> np.ndarray:
        """Sentence embeddings [len(rows), hidden] (float32, row order): the mean of the model's
        last hidden state over each row's own tokens (padding excluded)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
        try:
            for index, batch in self.indexed_batches(rows, batch_size):
                mask = batch["attention_mask"].to(device)
                hidden = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=mask,
                    output_hidden_states=True,
                ).hidden_states[-1]
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
                out[index] = mean.float().cpu().numpy()
        finally:
            model.train(was_training)
        return out

    def decode(self, row: dict[str, Any]) -> str:  # pragma: no cover - overridden
        """The text of one encoded row."""
        raise NotImplementedError

    def example_hits(
        self, model: nn.Module, rows: list[dict[str, Any]], batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - overridden
        """Per row, in row order: (correct predictions, predictions made)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, rows: list[dict[str, Any]], batch_size: int = 256
    ) -> dict[str, float]:  # pragma: no cover - overridden
        raise NotImplementedError


def freeze_lower(model: nn.Module, embeddings: bool, layers: int) -> None:
    """Stop gradients of a pretrained encoder's embeddings (if `embeddings`) and of its lowest
    `layers` layers (BERT-family naming: `<base>.embeddings.`, `<base>.encoder.layer.<i>.`)."""
    base = model.base_model_prefix
    prefixes = [f"{base}.embeddings."] if embeddings else []
    prefixes += [f"{base}.encoder.layer.{i}." for i in range(layers)]
    for name, param in model.named_parameters():
        if name.startswith(tuple(prefixes)):
            param.requires_grad_(False)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes: what devices send and the server aggregates."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in trainable_state(model) if n not in state]
    if missing:
        raise ValueError(f"model state lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
