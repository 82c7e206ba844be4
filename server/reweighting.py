"""Adversarial reweighting of a round's replies by their devices' loss (ARW-style).

Training is treated as a min-max game: the model minimises, an adversary maximises the
reweighted risk  sum_i lambda_i * w_i * L_i(theta)  over the round's devices, with w_i the
reply's usual aggregation weight and L_i the device's loss at the current global model (its
"global_loss" metric). The adversary's move is one exponentiated-gradient (mirror-ascent) step
of size `step` from lambda = 1, centred on the round's mean loss:

    lambda_i = clip(exp(step * (L_i - mean_j L_j)), 1 / bound, bound)

so devices the global model serves worse than average count more in the average, better-served
ones less, and equal losses leave the base weights unchanged. The adversary is *bounded*: every
multiplier lambda_i lies in [1/bound, bound] (so two devices' relative weights change by at most
bound**2). Unbounded, the maximiser puts all weight on the single
worst device: one noisy, mislabelled or tiny device would then drive the global model, and the
update's variance would grow without limit. The box is the likelihood-ratio ball of
distributionally robust optimisation (as in Lahoti et al., 2020, whose adversary is also kept
from concentrating): a worst case over plausible reweightings of the population, not over single
devices. `bound = 1` or `step = 0` is plain weighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdversarialReweighting:
    """lambda_i = clip(exp(step * (loss_i - mean loss)), 1/bound, bound) over a round's devices."""

    step: float = 1.0
    bound: float = 5.0

    def __post_init__(self) -> None:
        if not self.step >= 0:
            raise ValueError(f"reweighting step must be >= 0, got {self.step}")
        if not self.bound >= 1:
            raise ValueError(f"reweighting bound must be >= 1, got {self.bound}")

    def multipliers(self, losses: np.ndarray) -> np.ndarray:
        """The adversary's lambda per device. A device without a finite loss (NaN: it had no
        rows) gets 1 and is left out of the mean."""
        losses = np.asarray(losses, dtype=float)
        finite = np.isfinite(losses)
        if not finite.any():
            return np.ones_like(losses)
        centred = np.where(finite, losses - losses[finite].mean(), 0.0)
        limit = np.log(self.bound)  # clipping the exponent: the same box, without overflow
        return np.exp(np.clip(self.step * centred, -limit, limit))

    def weights(self, base: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """The replies' aggregation weights `base`, each times its device's lambda."""
        base = np.asarray(base, dtype=float)
        if base.shape != np.shape(losses):
            raise ValueError(f"{base.shape[0]} weights but {np.size(losses)} losses")
        return base * self.multipliers(losses)
