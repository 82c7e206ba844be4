"""Intent classification (CLINC150 by default) with a pretrained BERT-family encoder."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedtrust.errors import DataError, ModelError

from .base import Task, freeze_lower
from .models import HEAD_PREFIXES, quiet_transformers, resolve_model
from .spec import TaskSpec

OUT_OF_SCOPE = "oos"


@dataclass
class IntentTask(Task):
    model_name: str = ""
    labels: tuple[str, ...] = ()
    freeze_embeddings: bool = True
    freeze_layers: int = 0

    def build_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)  # the new classifier head is the only random part
        quiet_transformers()
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_name,
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={name: i for i, name in enumerate(self.labels)},
        )
        layers = getattr(model.config, "num_hidden_layers", None)
        if layers is not None and self.freeze_layers > layers:
            raise ModelError(
                f"task.freeze_layers = {self.freeze_layers}, but the model has only {layers} "
                f"encoder layers (freezing all {layers} trains the pooler and classifier only)"
            )
        freeze_lower(model, self.freeze_embeddings, self.freeze_layers)
        return model

    @cached_property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded from `model_name` on first use and kept."""
        return AutoTokenizer.from_pretrained(self.model_name)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (e.g. to a Ray worker) without the cached tokenizer; it reloads on use."""
        state = dict(self.__dict__)
        state.pop("tokenizer", None)
        return state

    def decode(self, row: dict[str, Any]) -> str:
        """The row's text as the tokenizer reads it back (lower-cased wordpieces for BERT)."""
        return self.tokenizer.decode(row["input_ids"], skip_special_tokens=True)

    def save(self, model: nn.Module, folder: Path) -> None:
        super().save(model, folder)
        self.tokenizer.save_pretrained(folder)

    def _labels(self, rows: list[dict], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.tensor([r["labels"] for r in rows], dtype=torch.long)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, rows: list[dict[str, Any]], batch_size: int = 256
    ) -> dict[str, float]:
        """Accuracy overall, on in-scope intents, and recall of out-of-scope queries."""
        model.eval()
        oos = self.labels.index(OUT_OF_SCOPE) if OUT_OF_SCOPE in self.labels else -1
        hits = total = in_hits = in_total = oos_hits = oos_total = 0
        loss_sum = 0.0
        for batch in self.batches(rows, batch_size):
            out = model(**batch)
            loss_sum += float(out.loss) * len(batch["labels"])
            pred, gold = out.logits.argmax(-1), batch["labels"]
            correct = pred == gold
            in_scope = gold != oos
            hits += int(correct.sum())
            total += len(gold)
            in_hits += int(correct[in_scope].sum())
            in_total += int(in_scope.sum())
            oos_hits += int(correct[~in_scope].sum())
            oos_total += int((~in_scope).sum())
        metrics = {"accuracy": hits / max(total, 1), "loss": loss_sum / max(total, 1)}
        if oos >= 0:
            metrics["in_scope_accuracy"] = in_hits / max(in_total, 1)
            metrics["oos_recall"] = oos_hits / max(oos_total, 1)
        return metrics

    @torch.no_grad()
    def example_hits(
        self, model: nn.Module, rows: list[dict[str, Any]], batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per row, in row order: (correct predictions, predictions) = (0 or 1, 1)."""
        model.eval()
        hits = []
        for start in range(0, len(rows), batch_size):
            batch = self.collate(rows[start : start + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hits.append((logits.logits.argmax(-1) == batch["labels"]).numpy())
        correct = np.concatenate(hits).astype(float) if hits else np.zeros(0)
        return correct, np.ones_like(correct)


def build_intent_task(raw, spec: TaskSpec) -> IntentTask:
    """Tokenise once; labels become ids in sorted order of the training labels' names.

    Test and validation labels must all occur in training (`load_raw` names the line of a
    separate test/validation file; this catches a label held out of a single dataset).
    """
    model_name = resolve_model(spec.model)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    splits = {name: split.to_dict() for name, split in raw.items()}  # columns as plain lists
    labels = tuple(sorted({str(x) for x in splits["train"]["label"]}))
    index = {name: i for i, name in enumerate(labels)}
    sources = {"test": spec.test_dataset, "validation": spec.validation_dataset}
    for name, source in sources.items():
        unknown = sorted({str(x) for x in splits.get(name, {}).get("label", [])} - set(labels))
        if unknown:
            raise DataError(
                f"{source or spec.dataset}: {name} labels never seen in training: {unknown[:5]}"
            )

    def encode(split: dict[str, list]) -> list[dict[str, Any]]:
        ids = tokenizer(split["text"], truncation=True, max_length=spec.max_length)["input_ids"]
        rows = [{"input_ids": x, "labels": index[str(y)]} for x, y in zip(ids, split["label"])]
        for column in ("device", "cohort"):
            for row, value in zip(rows, split.get(column) or []):
                row[column] = str(value)
        return rows

    primary = "in_scope_accuracy" if OUT_OF_SCOPE in labels else "accuracy"
    task = IntentTask(
        kind="intent",
        train=encode(splits["train"]),
        test=encode(splits["test"]),
        validation=encode(splits["validation"]) if "validation" in splits else [],
        pad_id=tokenizer.pad_token_id or 0,
        primary_metric=primary,
        info={"num_labels": len(labels), "model": model_name},
        head_prefixes=HEAD_PREFIXES,
        model_name=model_name,
        labels=labels,
        freeze_embeddings=spec.freeze_embeddings,
        freeze_layers=spec.freeze_layers,
    )
    task.__dict__["tokenizer"] = tokenizer  # seed the cached property: no second load
    return task
