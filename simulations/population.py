"""The simulated device population: the task's data split into devices, with per-round storage.

Built deterministically from the config, so the server (for device metadata) and every simulated
device (for its own examples) build the same population independently, once per process.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Context

from fedtrust.clients.device_data import ArrivalSchedule, DeviceStore
from fedtrust.tasks import Task, build_task

from .canaries import audit_canaries
from .config import Config, ConfigError, config_from_dict
from .partition import partition

log = logging.getLogger(__name__)


STORES_KEPT = 64  # device stores a process keeps between messages (Ray actors serve many)


@dataclass
class Population:
    """The devices' data: O(devices) small arrays (an index array and a name per device), the
    arrival schedule, and the storage of only the devices recently asked for their rows."""

    cfg: Config
    task: Task
    parts: list[np.ndarray]  # training-set indices held by each device
    names: list[str]
    _stores: OrderedDict[int, DeviceStore] = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        self.schedule = ArrivalSchedule(self.sizes(), self.cfg.devices, [self.cfg.run.seed])

    @property
    def size(self) -> int:
        return len(self.parts)

    def sizes(self) -> np.ndarray:
        """Total examples each device will ever hold (its stream length)."""
        return np.fromiter((len(p) for p in self.parts), dtype=np.int64, count=len(self.parts))

    def store(self, device: int, server_round: int) -> DeviceStore:
        """The device's storage at `server_round` (replayed if asked for an earlier round)."""
        store = self._stores.pop(device, None)
        if store is None or store.round > server_round:
            arrived = self.schedule.arrived
            store = DeviceStore(
                self.parts[device],
                self.cfg.devices,
                self.cfg.run.seed,
                device,
                lambda r: int(arrived(r)[device]),
            )
        self._stores[device] = store  # most recently used last
        while len(self._stores) > STORES_KEPT:
            self._stores.popitem(last=False)
        store.advance_to(server_round)
        return store

    def counts(self, server_round: int) -> np.ndarray:
        """Available examples on every device in `server_round`: the device metadata."""
        return self.schedule.counts(server_round)

    def rows(self, device: int, server_round: int) -> list[dict[str, Any]]:
        """The encoded examples `device` holds in `server_round`."""
        indices = self.store(device, server_round).available(server_round)
        return [self.task.train[i] for i in indices]

    # what a simulated device reads (fedtrust.clients.app.DeviceData)
    def name(self, device: int) -> str:
        return self.names[device]

    def count(self, device: int, server_round: int) -> int:
        return self.schedule.count(device, server_round)

    def stream_length(self, device: int) -> int:
        return len(self.parts[device])


def build_population(cfg: Config) -> Population:
    task = build_task(cfg.task, seed=cfg.run.seed)
    labels = [r["labels"] for r in task.train] if task.kind == "intent" else None
    devices = [r.get("device") for r in task.train]
    parts, names = partition(cfg.partition, labels, devices, cfg.run.seed)
    if cfg.audit.plant_canaries:  # the privacy audit's secrets, on one device
        parts = _plant_canaries(cfg, task, parts)
    log.info("%d devices, %d training examples", len(parts), len(task.train))
    return Population(cfg, task, parts, names)


def _plant_canaries(cfg: Config, task: Task, parts: list[np.ndarray]) -> list[np.ndarray]:
    device = cfg.audit.canary_device
    if not 0 <= device < len(parts):
        raise ConfigError(
            f"audit.canary_device: {device} is not a device (the population has {len(parts)})"
        )
    _, rows = audit_canaries(cfg, task)
    start = len(task.train)
    task.train.extend(rows)
    index = np.arange(start, start + len(rows))
    is_decoy = np.array([r["canary"] < 0 for r in rows], dtype=bool)
    others = [d for d in range(len(parts)) if d != device] or [device]
    parts = list(parts)
    parts[device] = np.concatenate([parts[device], index[~is_decoy]])
    for i, row in enumerate(index[is_decoy]):  # decoys: other users, one after another
        d = others[i % len(others)]
        parts[d] = np.concatenate([parts[d], [row]])
    log.info(
        "planted %d canary rows on device %d, %d decoys on other devices",
        int((~is_decoy).sum()),
        device,
        int(is_decoy.sum()),
    )
    return parts


_CACHE: dict[str, Population] = {}


def cached_population(cfg: Config) -> Population:
    """One population per process and config (Ray actors serve many devices in turn)."""
    key = json.dumps(
        {k: v for k, v in cfg.to_dict().items() if k in ("task", "partition", "devices", "audit")}
        | {"seed": cfg.run.seed},
        sort_keys=True,
    )
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_population(cfg)
    return _CACHE[key]


@dataclass(frozen=True)
class PopulationSource:
    """The device data source handed to the ClientApp: small to pickle (Ray ships it with every
    message), it builds the population once per process from the config."""

    config: dict[str, Any]

    def __call__(self, context: Context | None = None) -> Population:
        return cached_population(config_from_dict(self.config))
