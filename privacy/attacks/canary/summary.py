"""Per-canary results of both attacks, and their means per repetition level."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from .data import DIGITS, Canary, LabelIndex
from .extraction import exposure, extract_secret


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
