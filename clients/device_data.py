"""What a device holds in a given round: all its data (static) or a continual stream with a cap.

In the continual setting a device's examples arrive over rounds: a share `initial_fraction` is there
at round 1, then Poisson(`arrival_rate` x stream length) new ones each round until the stream runs
dry. When storage holds more than `capacity` examples, the oldest (fifo) or random ones are deleted.
Everything is a pure function of the seed, the round and the population (below), so the server's
metadata, the device and a resumed run all agree without sharing state.

The arrivals of a whole population are drawn as one vector per round (`ArrivalSchedule`): the
server's per-round metadata (every device's count) costs a few numpy operations, not one Python
object per device, and a device's own storage (`DeviceStore`) is built only when it is asked.
A device's arrivals are then a function of (seed, round, its place in the population and the
population's stream lengths): planting canary rows on one device redraws everyone's schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass
class StorageSettings:
    """How examples reach a device and how many it keeps (the `[devices]` config section)."""

    mode: Literal["static", "continual"] = "static"
    initial_fraction: float = 0.2  # continual: share of a device's stream present at round 1
    arrival_rate: float = 0.1  # continual: expected new examples per round, share of the stream
    capacity: int = 0  # continual: storage cap in examples (0 = unlimited)
    eviction: Literal["fifo", "random"] = "fifo"


class ArrivalSchedule:
    """How many examples have arrived on every device by each round, for a population whose
    devices hold `sizes` examples in all (their stream lengths); drawn from `key` and the round.
    """

    def __init__(self, sizes: np.ndarray, settings: StorageSettings, key: Sequence[int]) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.settings, self.key = settings, list(key)
        # [r]: arrived by round r, int32 (a round costs 4 bytes per device)
        self._arrived = [np.zeros(len(self.sizes), dtype=np.int32)]

    def arrived(self, server_round: int) -> np.ndarray:
        """Examples arrived on each device by `server_round` (all of them in static mode)."""
        if self.settings.mode == "static":
            return self.sizes
        while len(self._arrived) <= server_round:
            r = len(self._arrived)
            if r == 1:
                fraction = self.settings.initial_fraction
                new = np.maximum(1, np.ceil(fraction * self.sizes).astype(np.int64))
            else:
                rng = np.random.default_rng([*self.key, r, 0xA771])
                new = rng.poisson(self.settings.arrival_rate * self.sizes)
            arrived = np.minimum(self._arrived[-1] + new, self.sizes)
            self._arrived.append(arrived.astype(np.int32))
        return self._arrived[server_round]

    def count(self, device: int, server_round: int) -> int:
        """Examples `device` holds in `server_round` (one device: no vector work)."""
        return int(self._held(self.arrived(server_round)[device]))

    def counts(self, server_round: int) -> np.ndarray:
        """Examples each device holds in `server_round`: arrived, up to the storage cap."""
        return self._held(self.arrived(server_round))

    def _held(self, arrived: np.ndarray) -> np.ndarray:
        cap = self.settings.capacity
        return np.minimum(arrived, cap) if cap > 0 and self.settings.mode != "static" else arrived


class DeviceStore:
    """One device's storage, advanced round by round.

    `arrived(r)`: how many of its examples have arrived by round r (the population's
    `ArrivalSchedule`); by default a schedule of this device alone, drawn from (seed, device).
    """

    def __init__(
        self,
        stream: np.ndarray,
        settings: StorageSettings,
        seed: int,
        device: int,
        arrived: Callable[[int], int] | None = None,
    ) -> None:
        self.settings = settings
        self.seed, self.device = seed, device
        if arrived is None:
            alone = ArrivalSchedule(np.array([len(stream)]), settings, [seed, device])
            arrived = lambda r: int(alone.arrived(r)[0])  # noqa: E731
        self._arrived_by = arrived
        self.static = settings.mode == "static"
        order = np.random.default_rng([seed, device, 0]).permutation(len(stream))
        self.stream = np.asarray(stream)[order] if not self.static else np.asarray(stream)
        self.round = 0
        self.arrived = 0  # how much of the stream has arrived so far
        self.stored: list[int] = []  # positions in the stream, oldest first

    def advance_to(self, server_round: int) -> None:
        if server_round < self.round:
            raise ValueError(f"device {self.device}: cannot go back from round {self.round}")
        while self.round < server_round:
            self.round += 1
            self._step()

    def _step(self) -> None:
        if self.static:
            return
        rng = np.random.default_rng([self.seed, self.device, self.round])
        new = self._arrived_by(self.round) - self.arrived
        self.stored.extend(range(self.arrived, self.arrived + new))
        self.arrived += new
        excess = len(self.stored) - self.settings.capacity if self.settings.capacity > 0 else 0
        if excess > 0:
            if self.settings.eviction == "fifo":
                del self.stored[:excess]
            else:
                drop = set(rng.choice(len(self.stored), size=excess, replace=False).tolist())
                self.stored = [s for i, s in enumerate(self.stored) if i not in drop]

    def available(self, server_round: int) -> np.ndarray:
        """Indices (into the training set) of the examples present in `server_round`."""
        self.advance_to(server_round)
        return self.stream if self.static else self.stream[self.stored]

    def count(self, server_round: int) -> int:
        self.advance_to(server_round)
        return len(self.stream) if self.static else len(self.stored)
