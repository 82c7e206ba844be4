"""Next-character language modelling (Shakespeare by default) with a small GPT-2.

The vocabulary is the set of characters of the corpus: no tokenizer download, a tiny embedding
table, and the same task as LEAF's Shakespeare benchmark. The model is randomly initialised.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from .base import Task
from .spec import TaskSpec

IGNORE = -100


@dataclass
class CharLMTask(Task):
    vocab: str = ""
    context: int = 64
    layers: int = 2
    width: int = 128
    heads: int = 4

    def build_model(self, seed: int = 0) -> nn.Module:
        vocab_size = len(self.vocab) + 1  # + padding
        return gpt2_model(
            vocab_size, self.context, self.layers, self.width, self.heads, self.pad_id, seed
        )

    def save(self, model: nn.Module, folder: Path) -> None:
        super().save(model, folder)
        (folder / "vocab.json").write_text(json.dumps({"chars": self.vocab, "pad_id": self.pad_id}))

    def _labels(self, rows: list[dict], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ids.masked_fill(mask == 0, IGNORE)

    def decode(self, row: dict[str, Any]) -> str:
        """The row's characters (padding dropped)."""
        return "".join(self.vocab[i - 1] for i in row["input_ids"] if i != self.pad_id)

    def sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's mean next-character loss over its OWN characters.

        transformers' loss averages over every character in the batch, which scales each
        row's gradient by its share of the batch's characters: adding or removing a short row
        would then rescale every other row's gradient, and the per-sample bound C would not hold.
        """
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        gold = batch["labels"][:, 1:]
        token_loss = nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), gold, ignore_index=IGNORE, reduction="none"
        )
        counts = (gold != IGNORE).sum(1).clamp(min=1)
        return token_loss.sum(1) / counts

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, rows: list[dict[str, Any]], batch_size: int = 256
    ) -> dict[str, float]:
        """Next-character accuracy and perplexity, over every predicted character."""
        model.eval()
        hits = total = 0
        nll = 0.0
        for batch in self.batches(rows, batch_size):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            gold = batch["labels"][:, 1:]
            logits = logits[:, :-1]
            keep = gold != IGNORE
            nll += float(nn.functional.cross_entropy(logits[keep], gold[keep], reduction="sum"))
            hits += int((logits.argmax(-1)[keep] == gold[keep]).sum())
            total += int(keep.sum())
        loss = nll / max(total, 1)
        return {
            "accuracy": hits / max(total, 1),
            "loss": loss,
            "perplexity": math.exp(min(loss, 50)),
        }

    @torch.no_grad()
    def example_hits(
        self, model: nn.Module, rows: list[dict[str, Any]], batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per row, in row order: (correctly predicted characters, predicted characters)."""
        model.eval()
        hits, totals = [], []
        for start in range(0, len(rows), batch_size):
            batch = self.collate(rows[start : start + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            gold = batch["labels"][:, 1:]
            keep = gold != IGNORE
            correct = (logits.logits[:, :-1].argmax(-1) == gold) & keep
            hits.append(correct.sum(1).numpy())
            totals.append(keep.sum(1).numpy())
        if not hits:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(hits).astype(float), np.concatenate(totals).astype(float)


def gpt2_model(
    vocab_size: int, context: int, layers: int, width: int, heads: int, pad_id: int, seed: int
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (seeded): fedtrust's one way to build a small LM."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        pad_token_id=pad_id,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def build_lm_task(raw, spec: TaskSpec) -> CharLMTask:
    """Cut every text into `max_length`-character examples that keep their device (train, test
    and, when the data has one, validation: a validation_dataset)."""
    splits = {name: split.to_dict() for name, split in raw.items()}  # columns as plain lists
    texts = [text for split in splits.values() for text in split["text"]]
    vocab = "".join(sorted(set("".join(texts))))  # every split's characters: none is unknown
    index = {ch: i + 1 for i, ch in enumerate(vocab)}  # 0 is padding

    def encode(split: dict[str, list]) -> list[dict[str, Any]]:
        devices = split.get("device") or [None] * len(split["text"])
        cohorts = split.get("cohort") or [None] * len(split["text"])
        rows = []
        for text, device, cohort in zip(split["text"], devices, cohorts):
            ids = [index[ch] for ch in text]
            for start in range(0, len(ids), spec.max_length):
                chunk = ids[start : start + spec.max_length]
                if len(chunk) >= 2:
                    row: dict[str, Any] = {"input_ids": chunk}
                    if device is not None:
                        row["device"] = str(device)
                    if cohort is not None:
                        row["cohort"] = str(cohort)
                    rows.append(row)
        return rows

    return CharLMTask(
        kind="lm",
        train=encode(splits["train"]),
        test=encode(splits["test"]),
        validation=encode(splits["validation"]) if "validation" in splits else [],
        pad_id=0,
        primary_metric="accuracy",
        info={"vocab_size": len(vocab) + 1},
        vocab=vocab,
        context=spec.max_length,
        layers=spec.lm_layers,
        width=spec.lm_width,
        heads=spec.lm_heads,
    )
