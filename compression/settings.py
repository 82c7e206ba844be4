"""How a device compresses its model update: one frozen, checked settings object."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

from fedtrust.errors import ConfigError

from .hashing import split_buckets

METHODS = ("none", "sparse-diff", "hashed-diff", "topk", "quantize")
SPARSE_METHODS = ("topk", "sparse-diff")
FEEDBACK_METHODS = ("topk", "quantize")
MAX_BITS = 16


@dataclass
class CompressionSettings:
    """The `compression` table of a run config.

    method: none | sparse-diff | hashed-diff | topk | quantize.
    density: topk and sparse-diff: fraction of the update's entries sent, over the whole update.
    buckets: hashed-diff: total buckets over the whole update; 0 derives round(density * entries).
    bits: quantize: bits per value (0 = 8); other methods: > 0 also quantises the sent values.
    error_feedback: topk and quantize: keep what was not sent on the device for the next round.
    prune_until: sparse-diff: fraction of the local steps by which the target density is reached.
    prune_events: sparse-diff: pruning steps along the schedule, the last one at prune_until.
    """

    method: str = "none"
    density: float = 0.01
    buckets: int = 0
    bits: int = 0
    error_feedback: bool = True
    prune_until: float = 0.75
    prune_events: int = 4

    def check(self) -> CompressionSettings:
        """Raise ConfigError (one line naming field and value) on the first bad value."""
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ConfigError(
                f"compression.method: {self.method!r} is not one of {', '.join(METHODS)}"
            )
        if not _real(self.density) or not 0 < self.density <= 1:
            raise ConfigError(f"compression.density: {self.density!r} is outside (0, 1]")
        if not _integer(self.buckets):
            raise ConfigError(f"compression.buckets: {self.buckets!r} is not a whole number")
        if self.buckets < 0:
            raise ConfigError(
                f"compression.buckets: {self.buckets!r} is < 1 (0 derives them from density)"
            )
        if not _integer(self.bits) or not 0 <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"compression.bits: {self.bits!r} is outside 1..{MAX_BITS} (0 = default)"
            )
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(
                f"compression.error_feedback: {self.error_feedback!r} is not true or false"
            )
        if not _real(self.prune_until) or not 0 < self.prune_until <= 1:
            raise ConfigError(f"compression.prune_until: {self.prune_until!r} is outside (0, 1]")
        if not _integer(self.prune_events) or self.prune_events < 1:
            raise ConfigError(f"compression.prune_events: {self.prune_events!r} is < 1")
        return self

    @property
    def effective_bits(self) -> int:
        """Bits per sent value; 0 means float32 values (no quantisation)."""
        if self.method == "quantize":
            return self.bits or 8
        if self.method == "none":
            return 0
        return self.bits

    @property
    def feedback(self) -> bool:
        """Whether this method keeps an error-feedback residual on the device."""
        return self.error_feedback and self.method in FEEDBACK_METHODS

    def keep_count(self, entries: int) -> int:
        """topk / sparse-diff: how many of the update's `entries` are sent (at least 1)."""
        return min(entries, max(1, round(self.density * entries)))

    def check_shapes(self, shapes: Mapping[str, Sequence[int]]) -> CompressionSettings:
        """ConfigError (one line) if this method cannot encode updates of tensors `shapes`
        (hashed-diff: too few or too many buckets for them); returns self. Call it at start,
        not first on the devices."""
        if self.check().method == "hashed-diff":
            numels = {name: math.prod(shape) for name, shape in shapes.items()}
            split_buckets(numels, self.bucket_count(sum(numels.values())))
        return self

    def bucket_count(self, entries: int) -> int:
        """hashed-diff: total buckets for an update of `entries` entries."""
        if self.buckets:
            return self.buckets
        derived = round(self.density * entries)
        if derived < 1:
            raise ConfigError(
                f"compression.density: {self.density!r} derives {derived} buckets < 1 for "
                f"{entries} entries; raise it or set compression.buckets"
            )
        return derived


def _real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)
