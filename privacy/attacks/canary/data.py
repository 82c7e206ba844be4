"""Canaries and decoys: the secrets an audit plants in a text classifier's training data.

A *canary* is a sentence such as ``"my pin code is 3 7 1 9"`` inserted ``repetitions`` times into
the training data with a chosen intent label; *decoys* are other users saying the same prefixes
with other secrets and labels. The layout is BERT's: ``[CLS] prefix secret [SEP]``, each secret
token one vocabulary token.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DIGITS = tuple(str(d) for d in range(10))
TEMPLATES = ("my pin code is", "call me on", "my account number is", "my security code is")

LabelIndex = Mapping[str, int] | Sequence[str]


@dataclass(frozen=True)
class Canary:
    """A secret (space-separated tokens) after a prefix, inserted `repetitions` times."""

    prefix: str
    secret: str
    label: str
    repetitions: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.repetitions, numbers.Integral) or self.repetitions < 1:
            raise ValueError(
                f"canary repetitions must be an integer >= 1, got {self.repetitions!r}"
            )
        if not self.secret.split():
            raise ValueError(f"canary secret must hold at least one token, got {self.secret!r}")

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret}"

    @property
    def tokens(self) -> list[str]:
        return self.secret.split()


def make_canaries(
    labels: Sequence[str],
    repetitions: Sequence[int] = (1, 5, 20),
    per_level: int = 2,
    secret_length: int = 4,
    seed: int = 0,
    templates: Sequence[str] = TEMPLATES,
) -> list[Canary]:
    """`per_level` canaries per repetition level: random digit secrets (all different), random
    labels out of `labels`, templates in turn."""
    for r in repetitions:
        if not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"canary repetitions must be integers >= 1, got {r!r}")
    if not labels:
        raise ValueError("make_canaries needs at least one label")
    if not templates:
        raise ValueError("make_canaries needs at least one template")
    count = len(repetitions) * per_level
    if secret_length < 1 or count > 10**secret_length:
        raise ValueError(f"{count} distinct secrets of {secret_length} digits do not exist")
    rng = np.random.default_rng(seed)
    secrets: list[str] = []
    while len(secrets) < count:
        secret = " ".join(rng.choice(list(DIGITS), size=secret_length))
        if secret not in secrets:
            secrets.append(secret)
    canaries = []
    for i, (secret, reps) in enumerate(zip(secrets, np.repeat(repetitions, per_level))):
        label = str(labels[int(rng.integers(len(labels)))])
        canaries.append(Canary(templates[i % len(templates)], secret, label, int(reps)))
    return canaries


def canary_rows(
    canaries: Sequence[Canary], tokenizer: Any, label_index: LabelIndex, max_length: int
) -> list[dict[str, Any]]:
    """Encoded training rows (`input_ids`, `labels`, `canary`: its index), each canary repeated
    `repetitions` times. `label_index` is the task's label names (or a name -> id mapping)."""
    rows = []
    for i, canary in enumerate(canaries):
        label = label_id(canary, label_index)
        prefix, secret = canary_layout(tokenizer, canary)
        ids = prefix[:-1] + secret + prefix[-1:]
        if len(ids) > max_length:
            raise ValueError(
                f"canary {canary.text!r} is {len(ids)} tokens long, over max_length = {max_length}"
            )
        rows += [
            {"input_ids": list(ids), "labels": label, "canary": i}
            for _ in range(canary.repetitions)
        ]
    return rows


def decoy_rows(
    canaries: Sequence[Canary],
    tokenizer: Any,
    label_index: LabelIndex,
    max_length: int,
    per_prefix: int,
    seed: int = 0,
    labels_per_prefix: int = 5,
    orders: int = 5,
) -> list[dict[str, Any]]:
    """Other users saying the canaries' prefixes: `per_prefix` rows per distinct prefix with
    random secrets of the same length (never a canary's), labelled with `labels_per_prefix`
    labels that no canary of that prefix has.

    Without decoys a classifier can map the prefix alone to the canary's label and never look at
    the secret; with them only the secret tells the canary apart, so what the attacks measure is
    memorisation of the secret itself (the worst case an audit asks about). Decoys come in groups
    of up to `orders` orderings of the same random tokens, each under a random one of the
    prefix's decoy labels: the digits' order carries the label (as it does for real numbers), so
    a model cannot get by on which digits occur. Nothing depends on the canaries' secrets, so a
    model trained on decoys alone learns nothing about them. `label_index` is the task's label
    names; decoy rows carry `canary: -1`.
    """
    if per_prefix < 0:
        raise ValueError(f"decoys per prefix must be >= 0, got {per_prefix}")
    names = list(label_index)  # label names (a mapping iterates over its names)
    label_ids = ids_of_labels(label_index)
    rng = np.random.default_rng([seed, 17])
    taken = {c.secret for c in canaries}
    rows: list[dict[str, Any]] = []
    for prefix_text in dict.fromkeys(c.prefix for c in canaries):
        group = [c for c in canaries if c.prefix == prefix_text]
        free = [n for n in names if n not in {c.label for c in group}]
        if not free:
            raise ValueError(f"no label left for the decoys of prefix {prefix_text!r}")
        chosen = rng.choice(len(free), size=min(labels_per_prefix, len(free)), replace=False)
        ids_of = [label_ids[free[int(k)]] for k in chosen]
        prefix, _ = canary_layout(tokenizer, group[0])
        length = len(group[0].tokens)
        alphabet = sorted({t for c in group for t in c.tokens} | set(DIGITS))
        space = len(alphabet) ** length
        if per_prefix > space - len(taken):
            raise ValueError(f"{per_prefix} decoys per prefix do not fit in {space} secrets")
        made = 0
        while made < per_prefix:
            tokens = list(rng.choice(alphabet, size=length))
            for _ in range(max(1, orders)):
                secret = " ".join(tokens)
                if made < per_prefix and secret not in taken:
                    taken.add(secret)
                    ids = prefix[:-1] + token_ids(tokenizer, tokens, "decoy") + prefix[-1:]
                    if len(ids) > max_length:
                        raise ValueError(f"decoy {prefix_text!r} is over max_length = {max_length}")
                    label = ids_of[int(rng.integers(len(ids_of)))]
                    rows.append({"input_ids": ids, "labels": label, "canary": -1})
                    made += 1
                rng.shuffle(tokens)
    return rows


# --- encoding -------------------------------------------------------------------------------


def canary_layout(tokenizer: Any, canary: Canary) -> tuple[list[int], list[int]]:
    """[CLS] prefix [SEP] ids and the secret's ids, checking the text tokenises as their join."""
    secret = token_ids(tokenizer, canary.tokens, "secret")
    prefix = tokenizer(canary.prefix)["input_ids"]
    if tokenizer(canary.text)["input_ids"] != prefix[:-1] + secret + prefix[-1:]:
        raise ValueError(
            f"canary {canary.text!r} does not tokenise as [CLS] prefix secret [SEP] "
            "(a BERT-family tokenizer is needed)"
        )
    return prefix, secret


def ids_of_labels(label_index: LabelIndex) -> Mapping[str, int]:
    """Label name -> id: `label_index` itself if a mapping, else names numbered in order."""
    if isinstance(label_index, Mapping):
        return label_index
    return {n: i for i, n in enumerate(label_index)}


def label_id(canary: Canary, label_index: LabelIndex) -> int:
    """The id of the canary's label, or a clear error naming the labels the task knows."""
    index = ids_of_labels(label_index)
    if canary.label not in index:
        known = sorted(index)
        raise ValueError(
            f"canary label {canary.label!r} is not a label of the task "
            f"(known: {known[:10]}{' ...' if len(known) > 10 else ''}; "
            "attacks take labels=task.labels when model.config.label2id lacks it)"
        )
    return int(index[canary.label])


def token_ids(tokenizer: Any, tokens: Sequence[str], what: str) -> list[int]:
    """One vocabulary id per token, or a clear error naming the tokens that are not one token."""
    ids, bad = [], []
    for token in tokens:
        found = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(found) != 1 or found[0] == tokenizer.unk_token_id:
            bad.append(f"{token!r} -> {tokenizer.convert_ids_to_tokens(found)}")
        else:
            ids.append(found[0])
    if bad:
        raise ValueError(f"{what} tokens must each be one token of the tokenizer: {', '.join(bad)}")
    return ids
