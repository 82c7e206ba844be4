"""Empirical selection frequencies: how often each device is drawn over many rounds."""

from __future__ import annotations

import numpy as np


def draw_counts(selection, counts: np.ndarray, k: int, draws: int, seed: int = 0) -> np.ndarray:
    """How many of `draws` independent rounds chose each device (each round without
    replacement)."""
    rng = np.random.default_rng(seed)
    hits = np.zeros(len(counts))
    for _ in range(draws):
        chosen = selection.draw(counts, k, rng)
        assert len(set(chosen.tolist())) == len(chosen)  # without replacement
        hits[chosen] += 1
    return hits
