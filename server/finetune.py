"""Cohort fine-tuning: the last rounds of a run favour the worst-served cohort, anchored by EWC.

A run of T rounds with `CohortFinetune(rounds=R, ...)` has three parts:

1. rounds 1 .. T-R-1: ordinary training; devices report their loss at the global model
   ("global_loss"), which the strategy remembers per device;
2. round T-R (the Fisher round): besides training, each device returns the diagonal empirical
   Fisher of the global model on its rows; the server averages them weighted by examples
   (FedCurv's estimate of which parameters the population's fit depends on);
3. rounds T-R+1 .. T (the phase): at its first round `find_worst(counts, losses)` names the
   worst cohort from the remembered losses; its devices' selection weights are multiplied by
   `upweight` for the whole phase (`Upweighted`), and every device adds the EWC penalty
   ewc_lambda / 2 * sum_j F_j (theta_j - theta_global_j)^2 to its loss, theta_global being the
   model it received that round (a per-round anchor, as in FedCurv), so fine-tuning for the
   cohort moves mostly the parameters the rest of the population is insensitive to.

No device reported a loss before the phase (they were not asked: `global_loss` off): every
loss is NaN, `find_worst` is not called and the cohort is empty: no up-weighting, while EWC
still anchors the phase's training. `ewc_lambda = 0` asks for no Fisher and sends none.
Neither part runs under DP: the losses and the Fisher are not covered by a mechanism.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedtrust.errors import FederationError

from .selection import Selection

log = logging.getLogger(__name__)

FISHER_KEY = "fisher"  # the Fisher diagonal's ArrayRecord, and the config field asking for it
EWC_KEY = "ewc-lambda"  # config field: the EWC penalty's strength in the phase


@dataclass(frozen=True)
class CohortFinetune:
    """The last `rounds` rounds up-weight the cohort `find_worst` names, under an EWC anchor.

    `find_worst(counts, losses)`: the devices' available examples and last reported losses at
    the global model (NaN: never reported), both indexed by device; returns a bool mask.
    """

    rounds: int
    upweight: float
    ewc_lambda: float
    find_worst: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"fine-tuning rounds must be >= 1, got {self.rounds}")
        if not self.upweight > 0:
            raise ValueError(f"cohort up-weighting must be > 0, got {self.upweight}")
        if not self.ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.ewc_lambda}")

    def check(self, total_rounds: int) -> None:
        """The run must have a round before the phase (the Fisher round)."""
        if total_rounds <= self.rounds:
            raise ValueError(
                f"fine-tuning the last {self.rounds} rounds needs total_rounds > {self.rounds}, "
                f"got {total_rounds}"
            )

    def fisher_round(self, total_rounds: int) -> int:
        """The round whose devices also return their Fisher diagonal (0: none needed)."""
        return total_rounds - self.rounds if self.ewc_lambda > 0 else 0

    def in_phase(self, server_round: int, total_rounds: int) -> bool:
        return server_round > total_rounds - self.rounds

    def fields(
        self, server_round: int, total_rounds: int, fisher: dict[str, np.ndarray] | None
    ) -> tuple[dict[str, Any], ArrayRecord | None]:
        """This round's extra config fields, and the ArrayRecord to send with the messages:
        the request for the Fisher diagonal (the Fisher round), the averaged Fisher and the EWC
        strength (phase rounds), nothing otherwise."""
        if server_round == self.fisher_round(total_rounds):
            return {FISHER_KEY: True}, None
        if self.ewc_lambda > 0 and self.in_phase(server_round, total_rounds):
            if fisher is None:
                log.warning("round %d: no Fisher diagonal was collected; no EWC", server_round)
                return {}, None
            record = ArrayRecord({k: Array(v) for k, v in fisher.items()})
            return {EWC_KEY: float(self.ewc_lambda)}, record
        return {}, None

    def cohort(self, counts: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """The worst cohort's mask (empty when no device has reported a loss)."""
        losses = np.asarray(losses, dtype=float)
        if not np.isfinite(losses).any():
            log.warning("no device reported a loss: the fine-tuning phase up-weights nobody")
            return np.zeros(len(counts), dtype=bool)
        mask = np.asarray(self.find_worst(np.asarray(counts), losses), dtype=bool)
        if mask.shape != (len(counts),):
            raise FederationError(f"find_worst returned shape {mask.shape}, {len(counts)} devices")
        return mask


class Upweighted(Selection):
    """`base` with the sampling weights of the devices in `mask` multiplied by `factor`.

    Draws and inclusion probabilities come from the base class's sampler (Gumbel-top-k and its
    Monte-Carlo estimate) on these weights, so inverse-probability weighting stays consistent.
    The base's fairness floor is mixed in first, then the cohort is up-weighted.
    """

    def __init__(self, base: Selection, mask: np.ndarray, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"up-weighting factor must be > 0, got {factor}")
        self.base, self.mask, self.factor = base, np.asarray(mask, dtype=bool), float(factor)
        self.name, self.floor = f"{base.name}+cohort", base.floor

    def weights(self, counts: np.ndarray) -> np.ndarray:
        return self.base.weights(counts)

    def sampling_weights(self, counts: np.ndarray) -> np.ndarray:
        w = self.base.sampling_weights(counts)
        if w.shape != self.mask.shape:
            raise FederationError(f"cohort mask has {self.mask.size} devices, counts {w.size}")
        return w * np.where(self.mask, self.factor, 1.0)

    def at_round(self, server_round: int, total_rounds: int) -> Selection:
        return Upweighted(self.base.at_round(server_round, total_rounds), self.mask, self.factor)


def take_fisher(replies: Sequence[RecordDict]) -> list[tuple[ArrayRecord, float]]:
    """Remove the Fisher record from each reply that has one (Flower's strategies expect exactly
    one ArrayRecord per reply); return (record, the device's example count) for each."""
    return [
        (reply.pop(FISHER_KEY), float(reply["device"]["available"]))
        for reply in replies
        if FISHER_KEY in reply
    ]


def average_fisher(fishers: Sequence[tuple[ArrayRecord, float]]) -> dict[str, np.ndarray]:
    """The example-weighted mean of the devices' Fisher diagonals (equal weights if all are 0),
    scaled to mean 1 over all coordinates: the EWC strength `ewc_lambda` then does not depend
    on the loss's scale or the model's size (an average coordinate moved by d costs
    ewc_lambda / 2 * d**2)."""
    if not fishers:
        raise FederationError("the Fisher round got no Fisher diagonal from any device")
    w = np.array([n for _, n in fishers], dtype=float)
    w = w / w.sum() if w.sum() > 0 else np.full(len(fishers), 1 / len(fishers))
    out = {}
    for key in fishers[0][0].keys():
        arrays = [record[key].numpy() for record, _ in fishers]
        mean = sum(wi * a.astype(np.float64) for wi, a in zip(w, arrays))
        out[key] = mean
    total = sum(a.sum() for a in out.values())
    size = sum(a.size for a in out.values())
    scale = size / total if total > 0 else 1.0
    return {k: np.asarray(a * scale, dtype=fishers[0][0][k].numpy().dtype) for k, a in out.items()}
