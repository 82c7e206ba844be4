"""The distillation run's data: the corpus, its split, token streams and random training windows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fedtrust.errors import ConfigError, DataError
from fedtrust.fairness.wordpairs import WordPairs
from fedtrust.tasks.data import DATA_DIR

SHAKESPEARE = DATA_DIR / "shakespeare" / "tinyshakespeare.txt"


@dataclass
class Corpus:
    """Token streams: training text, its gender-swapped counterfactual, held-out text."""

    train: torch.Tensor
    train_swapped: torch.Tensor
    val: torch.Tensor


def read_corpus(name: str) -> str:
    """The bundled Shakespeare or a UTF-8 text file."""
    path = SHAKESPEARE if name == "shakespeare" else Path(name)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text file ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the corpus ({err.strerror or err})") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, held-out): the held-out part is the tail, cut at a line break."""
    cut = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """One long stream of token ids (lines are encoded separately, so no length limit bites)."""
    ids: list[int] = []
    for block in text.split("\n\n"):
        if block.strip():
            ids.extend(tokenizer.encode(block + "\n\n", add_special_tokens=False))
    return torch.tensor(ids, dtype=torch.long)


def token_streams(
    tokenizer: PreTrainedTokenizerBase,
    train_text: str,
    val_text: str,
    pairs: WordPairs | None,
    corpus_name: str,
    context: int,
) -> Corpus:
    """The encoded corpus; the gender-swapped training text only when `pairs` is given (CDA).

    A ConfigError when the corpus is too short for `context`."""
    swapped = pairs.swap(train_text) if pairs is not None else ""
    corpus = Corpus(
        train=encode(tokenizer, train_text),
        train_swapped=encode(tokenizer, swapped) if swapped else torch.empty(0, dtype=torch.long),
        val=encode(tokenizer, val_text),
    )
    if len(corpus.train) <= context + 1 or len(corpus.val) < 2:
        raise ConfigError(
            f"data.corpus: {corpus_name!r} is too short for data.context = {context} "
            f"({len(corpus.train)} training and {len(corpus.val)} held-out tokens)"
        )
    return corpus


def get_batch(
    stream: torch.Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the stream (nanoGPT style): inputs and next-token labels."""
    starts = torch.randint(0, len(stream) - context - 1, (batch_size,), generator=generator)
    windows = torch.stack([stream[s : s + context + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def random_windows(
    stream: torch.Tensor, steps: int, batch_size: int, context: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches of `get_batch` windows, reproducible by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs, labels = get_batch(stream, batch_size, context, generator)
        yield {"input_ids": inputs, "labels": labels}
