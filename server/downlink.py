"""The server → device link under `[compression]`: the new global model as the entries that
changed since the version the device holds (`fedtrust.compression.lossless`).

The server remembers which version (the global model after round v; 0 = the initial model,
which every device builds itself) each device received last, and keeps the last `history`
versions. A device holding one of them gets the changed entries; any other device (never
reached, or holding a version too old) gets the full model. A resumed run starts with no
remembered versions, so its first messages carry full models: the bytes differ from an
uninterrupted run's, the models do not (the delta is lossless).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedtrust.compression.lossless import State, changed_entries, state_crc

DOWNLINK_KEY = "compression"  # the per-device ConfigRecord of a training message


class Downlink:
    def __init__(self, history: int = 8) -> None:
        self.history = history
        self.versions: dict[int, State] = {}
        self.held: dict[int, int] = {}  # device -> the version it last received (-1: unknown)
        # device -> the last round whose reply from it was aggregated: the error-feedback
        # residual it may carry on from (a reply the server did not use leaves nothing sent)
        self.used: dict[int, int] = {}
        self._crc: dict[int, int] = {}
        self._cache: dict[tuple[int, int], ArrayRecord] = {}

    def remember(self, version: int, arrays: ArrayRecord) -> None:
        """The global model `version`, about to be sent."""
        if version in self.versions:
            return
        self.versions[version] = {k: a.numpy().astype(np.float32) for k, a in arrays.items()}
        self._crc[version] = state_crc(self.versions[version])
        for old in sorted(self.versions)[: -self.history]:
            self.versions.pop(old)
        self._cache.clear()

    @property
    def oldest(self) -> int:
        return min(self.versions)

    def message(self, device: int, version: int) -> tuple[ArrayRecord, ConfigRecord]:
        """What `device` is sent for the global model `version` (which `remember` was given)."""
        base = self.held.get(device, 0)  # a device never reached holds the initial model
        if base not in self.versions:
            base = -1
        if base < 0:
            arrays = _record(self.versions[version])
        else:
            key = (base, version)
            if key not in self._cache:
                changes = changed_entries(self.versions[version], self.versions[base])
                self._cache[key] = _record(changes)
            arrays = self._cache[key]
        info = {
            "base-version": base,
            "base-crc": self._crc.get(base, 0),
            "version": version,
            "oldest": self.oldest,
            "crc": self._crc[version],
            "residual-round": self.used.get(device, -1),
        }
        return arrays, ConfigRecord(info)

    def rewrite(
        self,
        messages: Iterable[Message],
        device_of_node: dict[int, int],
        version: int,
        arrays: ArrayRecord,
    ) -> None:
        """Replace each training message's dense model (`arrays`, the global model `version`)
        by what its device needs."""
        self.remember(version, arrays)
        for msg in messages:
            device = device_of_node[msg.metadata.dst_node_id]
            sent, info = self.message(device, version)
            # Flower builds every message of a round around one shared RecordDict: each
            # device's message gets its own
            msg.content = RecordDict(
                {**dict(msg.content.items()), "arrays": sent, DOWNLINK_KEY: info}
            )

    def answered(self, version: int, answers: Iterable[Message], failures: Iterable) -> None:
        """After screening: a device that answered holds `version` now; one that failed or
        did not answer holds something unknown (its next message carries the full model)."""
        for failure in failures:
            self.held[failure.device] = -1
        for msg in answers:
            self.held[_device(msg)] = version

    def aggregated(self, server_round: int, replies: Iterable[Message]) -> None:
        """These replies of `server_round` went into the aggregate."""
        for msg in replies:
            self.used[_device(msg)] = server_round

    def state(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps: the rounds whose replies were used (residuals depend on
        it); held versions are not kept (a resumed run sends full models first)."""
        devices = sorted(self.used)
        return {
            "devices": np.array(devices, dtype=np.int64),
            "rounds": np.array([self.used[d] for d in devices], dtype=np.int64),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        devices, rounds = state.get("devices", []), state.get("rounds", [])
        self.used = {int(d): int(r) for d, r in zip(devices, rounds)}


def _record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def _device(msg: Message) -> int:
    return int(msg.content["device"]["device"])
