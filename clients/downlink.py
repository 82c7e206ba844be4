"""The device side of the compressed downlink: rebuild the global model from the entries that
changed since the version this device holds (`fedtrust.server.downlink` sends them).

A device keeps the last global model it received in its persistent storage. In a simulation
every device's storage is the run folder's `devices/held/`, where devices that hold the same
version share one file (their storage would hold the same bytes); a version older than the
server's window (`oldest`) is never asked for again and is deleted. Version 0 is the initial
model, which every device builds itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from fedtrust.compression.lossless import State, apply_changes, state_crc

HELD = "held"


class HeldModels:
    def __init__(self, folder: Path, initial: State) -> None:
        self.folder = Path(folder) / HELD
        self.initial = initial

    def receive(self, arrays: ArrayRecord, info: ConfigRecord) -> State:
        """The global model the message carries, checked against the server's checksum."""
        base, version = int(info["base-version"]), int(info["version"])
        sent = {k: a.numpy() for k, a in arrays.items()}
        state = sent if base < 0 else apply_changes(self._load(base, int(info["base-crc"])), sent)
        if state_crc(state) != int(info["crc"]):
            raise ValueError(
                f"the rebuilt global model of version {version} (from version {base}) does not "
                "match the server's checksum"
            )
        self._keep(version, int(info["crc"]), state, int(info["oldest"]))
        return state

    def _path(self, version: int, crc: int) -> Path:
        return self.folder / f"{version}-{crc}.npz"  # the checksum: never another run's file

    def _load(self, version: int, crc: int) -> State:
        if version == 0:
            return self.initial
        path = self._path(version, crc)
        if not path.exists():
            raise ValueError(f"asked to update the global model of version {version}, not held")
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    def _keep(self, version: int, crc: int, state: State, oldest: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(version, crc)
        if version > 0 and not path.exists():
            tmp = self.folder / f".{version}.{os.getpid()}.npz"
            with tmp.open("wb") as f:
                np.savez(f, **state)
            os.replace(tmp, path)
        for old in self.folder.glob("*-*.npz"):
            held = old.stem.split("-")[0]
            if held.isdigit() and int(held) < oldest:
                old.unlink(missing_ok=True)
