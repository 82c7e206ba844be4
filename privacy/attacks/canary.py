"""Canary extraction: does a text classifier memorise a secret planted in its training data?

A *canary* is a sentence such as ``"my pin code is 3 7 1 9"`` inserted ``repetitions`` times into
the training data with a chosen intent label. Two white-box attacks then ask how much of the
secret the trained model gives away, knowing its parameters, the prefix, the label and the
secret's length:

- `extract_secret`: model inversion. A continuous relaxation of the secret (per position, a
  softmax over the allowed tokens mixing the model's input embeddings) is optimised by gradient
  ascent on the label's log-odds given prefix + secret; the most probable tokens per position
  are then searched exhaustively, and the best sequence refined by coordinate ascent, scoring
  exact discrete sequences.
- `exposure`: the rank of the true secret among all (or sampled) candidate secrets by the same
  score, as in "The Secret Sharer" (Carlini et al., 2019).

The layout is BERT's: ``[CLS] prefix secret [SEP]``, each secret token one vocabulary token.

Usage::

    canaries = make_canaries(task.labels)
    task.train += canary_rows(canaries, tokenizer, task.labels, max_length=32)
    ...  # train the model
    results = canary_report(model, tokenizer, canaries, labels=task.labels)
    summarise(results)  # per repetition level: exact-match rate, token accuracy, exposure
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

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


@dataclass(frozen=True)
class ExtractionResult:
    """What `extract_secret` recovered, scored against the true secret."""

    secret: str  # the extracted secret, tokens joined by spaces
    exact: bool  # every token right
    token_accuracy: float  # fraction of positions right
    label_log_odds: float  # log p/(1-p) of the label given prefix + extracted secret


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
        label = _label_id(canary, label_index)
        prefix, secret = _layout(tokenizer, canary)
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
    label_ids = _ids_of_labels(label_index)
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
        prefix, _ = _layout(tokenizer, group[0])
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
                    ids = prefix[:-1] + _token_ids(tokenizer, tokens, "decoy") + prefix[-1:]
                    if len(ids) > max_length:
                        raise ValueError(f"decoy {prefix_text!r} is over max_length = {max_length}")
                    label = ids_of[int(rng.integers(len(ids_of)))]
                    rows.append({"input_ids": ids, "labels": label, "canary": -1})
                    made += 1
                rng.shuffle(tokens)
    return rows


def extract_secret(
    model: nn.Module,
    tokenizer: Any,
    canary: Canary,
    alphabet: Sequence[str] | None = DIGITS,
    labels: LabelIndex | None = None,
    steps: int = 150,
    lr: float = 0.3,
    restarts: int = 16,
    search_budget: int = 1024,
    refine_passes: int = 2,
    seed: int = 0,
    batch_size: int = 1024,
) -> ExtractionResult:
    """Recover `canary.secret` from a white-box model, knowing the prefix, length and label.

    `alphabet` are the allowed secret tokens (None: the whole vocabulary); `labels` maps label
    names to ids (default: `model.config.label2id`). Three stages:

    1. relaxation: `restarts` random relaxed secrets (per position, a softmax over the allowed
       tokens mixing their input embeddings) maximise the label's log-odds together (Adam, `steps`,
       `lr`), the softmax temperature annealed from 1 to 0.05 so they end near one-hot;
    2. search: every combination of the k most probable tokens per position (mean over the
       restarts; k**length <= `search_budget`) and each restart's argmax decoding are scored
       exactly; the best is kept;
    3. refinement: `refine_passes` passes of coordinate ascent (every allowed token at every
       position, scored exactly).

    A small space (10**4 digit secrets, `search_budget` >= 10**4) is thus searched exhaustively.
    """
    if restarts < 1:
        raise ValueError(f"extract_secret needs restarts >= 1, got {restarts}")
    label, prefix, truth, allowed = _setup(model, tokenizer, canary, alphabet, labels)
    length = len(truth)
    with _attack_mode(model):
        vocab = allowed.to(model.get_input_embeddings().weight.device)
        probs = _relax(model, prefix, vocab, length, label, steps, lr, restarts, seed)
        k = max(1, min(len(vocab), int(search_budget ** (1 / length) + 1e-9)))
        top = probs.mean(0).topk(k, dim=-1).indices.tolist()  # (L, k) indices into vocab
        pool = torch.tensor(list(itertools.product(*top)), device=vocab.device)
        pool = torch.cat([pool, probs.argmax(-1)])
        with torch.no_grad():
            scores = _scores(model, prefix, vocab[pool], label, batch_size)
            best, best_score = pool[int(scores.argmax())].clone(), float(scores.max())
            for _ in range(refine_passes):
                changed = False
                for pos in range(length):
                    trial = best.repeat(len(vocab), 1)
                    trial[:, pos] = torch.arange(len(vocab), device=trial.device)
                    scores = _scores(model, prefix, vocab[trial], label, batch_size)
                    i = int(scores.argmax())
                    if float(scores[i]) > best_score:
                        best[pos], best_score, changed = i, float(scores[i]), True
                if not changed:
                    break
    found = [int(i) for i in vocab[best]]
    right = sum(a == b for a, b in zip(found, truth))
    return ExtractionResult(
        secret=" ".join(tokenizer.convert_ids_to_tokens(found)),
        exact=right == length,
        token_accuracy=right / length,
        label_log_odds=best_score,
    )


def _relax(
    model: nn.Module,
    prefix: list[int],
    vocab: torch.Tensor,
    length: int,
    label: int,
    steps: int,
    lr: float,
    restarts: int,
    seed: int,
) -> torch.Tensor:
    """(restarts, length, K) token probabilities after optimising the relaxed secrets."""
    table = model.get_input_embeddings().weight
    candidates = table[vocab]  # (K, d): embeddings of the allowed tokens
    head = table[torch.tensor(prefix[:-1], device=table.device)].expand(restarts, -1, -1)
    tail = table[torch.tensor(prefix[-1:], device=table.device)].expand(restarts, -1, -1)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(restarts, length, len(vocab), generator=gen).to(table.device)
    optimiser = torch.optim.Adam([theta.requires_grad_()], lr=lr)
    temperature = 1.0
    for step in range(steps):
        temperature = 0.05 ** (step / max(steps - 1, 1))
        mix = torch.softmax(theta / temperature, dim=-1).to(table.dtype) @ candidates  # (R, L, d)
        logits = model(inputs_embeds=torch.cat([head, mix, tail], dim=1)).logits
        loss = -log_odds(logits, label).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return torch.softmax(theta.detach() / temperature, dim=-1)


def exposure(
    model: nn.Module,
    tokenizer: Any,
    canary: Canary,
    alphabet: Sequence[str] | None = DIGITS,
    labels: LabelIndex | None = None,
    num_candidates: int | None = 1000,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Exposure of the secret: log2 |S| - log2 rank (Carlini et al., 2019).

    S = all secrets of the canary's length over `alphabet` (None: the whole vocabulary); the
    score of a candidate is the label's log-odds given prefix + candidate. When |S| <=
    `num_candidates` (or `num_candidates` is None) every candidate is scored and the rank is
    exact (ties count half). Otherwise `num_candidates` secrets are drawn uniformly (with
    replacement, the true secret excluded) and, with g of them scoring above the secret, the
    rank in S is extrapolated as (g + 1) * |S| / (n + 1), i.e. the secret's position among the
    n + 1 scores scaled to |S|; exposures above about log2(n + 1) cannot be resolved from n
    samples. Returns `exposure`, `rank` (in S, possibly fractional), `candidates` (how many were
    scored) and `space` (|S|).
    """
    if num_candidates is not None and num_candidates < 1:
        raise ValueError(f"exposure needs num_candidates >= 1 (or None), got {num_candidates}")
    label, prefix, truth, allowed = _setup(model, tokenizer, canary, alphabet, labels)
    k, length = len(allowed), len(truth)
    space = k**length
    position = {int(t): i for i, t in enumerate(allowed)}
    true_index = torch.tensor([[position[i] for i in truth]])
    if num_candidates is None or space <= num_candidates:
        if space > 10**8:
            raise ValueError(f"{space} candidate secrets are too many to score: set num_candidates")
        grid = torch.arange(space)
        digits = [(grid // k**p) % k for p in reversed(range(length))]
        others = torch.stack(digits, dim=1)
        others = others[(others != true_index).any(dim=1)]
    else:
        gen = torch.Generator().manual_seed(seed)
        others = torch.empty(0, length, dtype=torch.long)
        while len(others) < num_candidates:
            draw = torch.randint(k, (num_candidates, length), generator=gen)
            others = torch.cat([others, draw[(draw != true_index).any(dim=1)]])[:num_candidates]
    with _attack_mode(model), torch.no_grad():
        vocab = allowed.to(model.get_input_embeddings().weight.device)
        pool = torch.cat([true_index, others]).to(vocab.device)
        scores = _scores(model, prefix, vocab[pool], label, batch_size)
        score, scores = scores[0], scores[1:]
    above = float((scores > score).sum()) + 0.5 * float((scores == score).sum())
    n = len(others)
    rank = (above + 1) * space / (n + 1)
    return {
        "exposure": math.log2(space) - math.log2(rank),
        "rank": rank,
        "candidates": n + 1,
        "space": space,
    }


def canary_report(
    model: nn.Module,
    tokenizer: Any,
    canaries: Sequence[Canary],
    alphabet: Sequence[str] | None = DIGITS,
    labels: LabelIndex | None = None,
    num_candidates: int | None = 1000,
    seed: int = 0,
    **extract_kw: Any,
) -> list[dict[str, Any]]:
    """`extract_secret` and `exposure` for every canary, one dict each; `extract_kw` go to
    `extract_secret` (steps, lr, restarts, refine_passes)."""
    results = []
    for canary in canaries:
        found = extract_secret(model, tokenizer, canary, alphabet, labels, seed=seed, **extract_kw)
        exp = exposure(model, tokenizer, canary, alphabet, labels, num_candidates, seed)
        results.append(
            {
                "text": canary.text,
                "label": canary.label,
                "repetitions": canary.repetitions,
                "secret": canary.secret,
                "extracted": found.secret,
                "exact": found.exact,
                "token_accuracy": found.token_accuracy,
                "label_log_odds": found.label_log_odds,
                "exposure": exp["exposure"],
                "rank": exp["rank"],
            }
        )
    return results


def summarise(results: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """Per repetition level: canaries, exact-match rate, token accuracy and exposure (means)."""
    levels: dict[int, list[Mapping[str, Any]]] = {}
    for r in results:
        levels.setdefault(int(r["repetitions"]), []).append(r)
    return {
        reps: {
            "canaries": len(group),
            "exact_rate": float(np.mean([r["exact"] for r in group])),
            "token_accuracy": float(np.mean([r["token_accuracy"] for r in group])),
            "exposure": float(np.mean([r["exposure"] for r in group])),
        }
        for reps, group in sorted(levels.items())
    }


# --- helpers ---------------------------------------------------------------------------------


def _setup(
    model: nn.Module,
    tokenizer: Any,
    canary: Canary,
    alphabet: Sequence[str] | None,
    labels: LabelIndex | None,
) -> tuple[int, list[int], list[int], torch.Tensor]:
    """The label id, [CLS] prefix [SEP] ids, secret ids and allowed ids, or a clear error."""
    if labels is None:
        labels = dict(getattr(model.config, "label2id", None) or {})
    label = _label_id(canary, labels)
    prefix, truth = _layout(tokenizer, canary)
    if alphabet is None:
        allowed = torch.arange(len(tokenizer))
    else:
        allowed = torch.tensor(sorted(set(_token_ids(tokenizer, list(alphabet), "alphabet"))))
    known = set(allowed.tolist())
    missing = [t for t, i in zip(canary.tokens, truth) if i not in known]
    if missing:
        raise ValueError(f"secret tokens {missing} of {canary.text!r} are not in the alphabet")
    return label, prefix, truth, allowed


def _layout(tokenizer: Any, canary: Canary) -> tuple[list[int], list[int]]:
    """[CLS] prefix [SEP] ids and the secret's ids, checking the text tokenises as their join."""
    secret = _token_ids(tokenizer, canary.tokens, "secret")
    prefix = tokenizer(canary.prefix)["input_ids"]
    if tokenizer(canary.text)["input_ids"] != prefix[:-1] + secret + prefix[-1:]:
        raise ValueError(
            f"canary {canary.text!r} does not tokenise as [CLS] prefix secret [SEP] "
            "(a BERT-family tokenizer is needed)"
        )
    return prefix, secret


def _ids_of_labels(label_index: LabelIndex) -> Mapping[str, int]:
    if isinstance(label_index, Mapping):
        return label_index
    return {n: i for i, n in enumerate(label_index)}


def _label_id(canary: Canary, label_index: LabelIndex) -> int:
    index = _ids_of_labels(label_index)
    if canary.label not in index:
        known = sorted(index)
        raise ValueError(
            f"canary label {canary.label!r} is not a label of the task "
            f"(known: {known[:10]}{' ...' if len(known) > 10 else ''}; "
            "attacks take labels=task.labels when model.config.label2id lacks it)"
        )
    return int(index[canary.label])


def _token_ids(tokenizer: Any, tokens: Sequence[str], what: str) -> list[int]:
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


def log_odds(logits: torch.Tensor, label: int) -> torch.Tensor:
    """log p/(1-p) of `label` per row: the logit minus the log-sum-exp of the other logits.

    Unlike log p it does not round to 0 when a memorising model is sure of the label (float32
    log p is exactly 0 beyond p ~ 1 - 6e-8), so secrets stay ranked and gradients stay alive.
    """
    logits = logits.float()
    others = logits.clone()
    others[:, label] = float("-inf")
    return logits[:, label] - torch.logsumexp(others, dim=-1)


def _scores(
    model: nn.Module, prefix: list[int], secrets: torch.Tensor, label: int, batch_size: int
) -> torch.Tensor:
    """The label's log-odds given [CLS] prefix secret [SEP], for each row of `secrets` (ids)."""
    head = torch.tensor(prefix[:-1], device=secrets.device)
    tail = torch.tensor(prefix[-1:], device=secrets.device)
    out = []
    for chunk in secrets.split(batch_size):
        ids = torch.cat([head.expand(len(chunk), -1), chunk, tail.expand(len(chunk), -1)], dim=1)
        out.append(log_odds(model(input_ids=ids).logits, label))
    return torch.cat(out)


@contextmanager
def _attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the attack; both restored afterwards."""
    training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(training)
