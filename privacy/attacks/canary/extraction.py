"""White-box canary attacks: how much of a planted secret does a trained classifier give away?

Knowing the model's parameters, the canary's prefix, label and secret length:

- `extract_secret`: model inversion. A continuous relaxation of the secret (per position, a
  softmax over the allowed tokens mixing the model's input embeddings) is optimised by gradient
  ascent on the label's log-odds given prefix + secret; the most probable tokens per position
  are then searched exhaustively, and the best sequence refined by coordinate ascent, scoring
  exact discrete sequences.
- `exposure`: the rank of the true secret among all (or sampled) candidate secrets by the same
  score, as in "The Secret Sharer" (Carlini et al., 2019).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import DIGITS, Canary, LabelIndex, canary_layout, label_id, token_ids


@dataclass(frozen=True)
class ExtractionResult:
    """What `extract_secret` recovered, scored against the true secret."""

    secret: str  # the extracted secret, tokens joined by spaces
    exact: bool  # every token right
    token_accuracy: float  # fraction of positions right
    label_log_odds: float  # log p/(1-p) of the label given prefix + extracted secret


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
    label = label_id(canary, labels)
    prefix, truth = canary_layout(tokenizer, canary)
    if alphabet is None:
        allowed = torch.arange(len(tokenizer))
    else:
        allowed = torch.tensor(sorted(set(token_ids(tokenizer, list(alphabet), "alphabet"))))
    known = set(allowed.tolist())
    missing = [t for t, i in zip(canary.tokens, truth) if i not in known]
    if missing:
        raise ValueError(f"secret tokens {missing} of {canary.text!r} are not in the alphabet")
    return label, prefix, truth, allowed


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
