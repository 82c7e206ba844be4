"""Pure clip-and-noise utilities for user-level DP on the server (DP-FedAvg style).

An update is a ``dict[str, Tensor]`` (e.g. ``trainable_state`` deltas) or a list of tensors; its
norm is the L2 norm of all tensors together. Typical server round, with C the clipping norm, σ
the noise multiplier and m the expected number of sampled clients::

    clipped = [clip_update(u, C)[0] for u in updates]
    mean = noisy_mean(clipped, noise_multiplier=σ, max_norm=C, denominator=m)

Account for it with `fedtrust.privacy.compute_epsilon([(σ, client_rate, rounds)], delta)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .errors import InvalidPrivacyParameterError

Update = Mapping[str, Tensor] | Sequence[Tensor]


def _items(update: Update) -> list[tuple[str | int, Tensor]]:
    if isinstance(update, Mapping):
        return list(update.items())
    return list(enumerate(update))


def _rebuild(update: Update, values: list[Tensor]) -> Update:
    if isinstance(update, Mapping):
        return dict(zip(update.keys(), values, strict=True))
    return list(values)


def update_norm(update: Update) -> float:
    """L2 norm of all tensors of `update` taken together."""
    sq = sum(float(t.detach().double().pow(2).sum()) for _, t in _items(update))
    return sq**0.5


def clip_update(update: Update, max_norm: float) -> tuple[Update, float]:
    """Scale `update` to norm ≤ `max_norm` (unchanged if already within); returns (update, norm)."""
    if not max_norm > 0:
        raise InvalidPrivacyParameterError(f"max_norm must be > 0, got {max_norm}")
    norm = update_norm(update)
    factor = min(1.0, max_norm / (norm + 1e-12))
    return _rebuild(update, [t * factor for _, t in _items(update)]), norm


def add_gaussian_noise(
    update: Update, std: float, generator: torch.Generator | None = None
) -> Update:
    """`update` plus independent N(0, std²) noise on every coordinate."""
    if not std >= 0:
        raise InvalidPrivacyParameterError(f"noise std must be >= 0, got {std}")
    return _rebuild(
        update,
        [
            t + torch.empty_like(t).normal_(0.0, std, generator=generator) if std > 0 else t.clone()
            for _, t in _items(update)
        ],
    )


def clip_and_noise(
    update: Update,
    max_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> Update:
    """Clip one update to `max_norm` C, then add N(0, (σC)²) noise (local / per-client DP)."""
    clipped, _ = clip_update(update, max_norm)
    return add_gaussian_noise(clipped, noise_multiplier * max_norm, generator)


def noisy_mean(
    clipped: Sequence[Update],
    noise_multiplier: float,
    max_norm: float,
    denominator: float | None = None,
    generator: torch.Generator | None = None,
) -> Update:
    """(Σ clipped updates + N(0, (σC)²)) / denominator (default: number of updates).

    Every update must already be clipped to `max_norm`; use a fixed expected number of clients
    as `denominator` when clients are Poisson-sampled.
    """
    if not clipped:
        raise ValueError("noisy_mean needs at least one update (use a zero update for none)")
    denom = float(denominator if denominator is not None else len(clipped))
    total = [torch.zeros_like(t) for _, t in _items(clipped[0])]
    for upd in clipped:
        for acc, (_, t) in zip(total, _items(upd), strict=True):
            acc.add_(t)
    noisy = add_gaussian_noise(_rebuild(clipped[0], total), noise_multiplier * max_norm, generator)
    return _rebuild(noisy, [t / denom for _, t in _items(noisy)])
