"""What the server knows about devices: which node is which device, and how much data each holds.

Devices check in once (a query message at the start of a run); after that the server never asks the
whole population again. Per-round counts come from device metadata: the simulated population's
schedule when there is one, else the count each device reported the last time it took part.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


class DeviceRegistry:
    def __init__(
        self,
        node_of_device: dict[int, int],
        metadata: Callable[[int], np.ndarray] | None = None,
        reported: dict[int, int] | None = None,
    ) -> None:
        self.node_of_device = dict(node_of_device)
        self.device_of_node = {n: d for d, n in self.node_of_device.items()}
        self.metadata = metadata
        self.reported = dict(reported or {})
        self.privacy: dict[int, dict] = {}  # device -> {"history", "epsilon", "participations"}
        self.max_participations = 0  # > 0: devices that used their DP budget stop being chosen

    @property
    def size(self) -> int:
        return len(self.node_of_device)

    def counts(self, server_round: int) -> np.ndarray:
        """Available examples per device (index = device id) for `server_round`.

        A device whose sample-level DP budget is used up counts as holding nothing.
        """
        if self.metadata is not None:
            counts = np.asarray(self.metadata(server_round))
            if len(counts) != self.size:
                raise RuntimeError(f"metadata has {len(counts)} devices, {self.size} checked in")
        else:
            counts = np.asarray([self.reported.get(d, 0) for d in range(self.size)])
        if self.max_participations:
            spent = [
                d
                for d, p in self.privacy.items()
                if p["participations"] >= self.max_participations or p.get("exhausted")
            ]
            counts = counts.copy()
            counts[spent] = 0
        return counts

    def privacy_state(self, devices) -> dict[str, dict]:
        """What each chosen device needs for DP-SGD: its accountant history and budget left."""
        out = {}
        for d in devices:
            p = self.privacy.get(int(d), {"history": [], "participations": 0})
            left = max(self.max_participations - p["participations"], 1)
            out[str(int(d))] = {"history": p["history"], "left": left}
        return out

    def update(self, replies: Iterable[Message]) -> None:
        """Refresh counts from the replies of the devices that took part."""
        for msg in replies:
            if not msg.has_error() and "device" in msg.content:
                info = msg.content["device"]
                device = int(info["device"])
                self.reported[device] = int(info["available"])
                if "epsilon" in info:
                    old = self.privacy.get(device, {"participations": 0})
                    self.privacy[device] = {
                        "history": json.loads(str(info["history"])),
                        "epsilon": float(info["epsilon"]),
                        "participations": old["participations"] + 1,
                        "exhausted": bool(info["budget-exhausted"]),
                    }

    def epsilon_summary(self) -> dict[str, float]:
        """Sample-level DP: the largest and the mean ε over devices that trained so far."""
        eps = [p["epsilon"] for p in self.privacy.values()]
        if not eps:
            return {}
        return {
            "epsilon": max(eps),
            "epsilon_mean": float(np.mean(eps)),
            "devices_out_of_budget": sum(
                1
                for p in self.privacy.values()
                if p.get("exhausted")
                or (self.max_participations and p["participations"] >= self.max_participations)
            ),
        }


def check_in(
    grid: Grid, config: ConfigRecord, expected: int, timeout: float = 600.0
) -> DeviceRegistry:
    """Wait for `expected` nodes, then ask each once which device it is and what it holds."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {expected} devices connected in {timeout} s")
        time.sleep(0.2)
    config = ConfigRecord({**config, "server-round": 1})
    messages = [
        Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    mapping, reported = {}, {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"device check-in failed: {reply.error.reason}")
        info = reply.content["device"]
        mapping[int(info["device"])] = reply.metadata.src_node_id
        reported[int(info["device"])] = int(info["available"])
    missing = sorted(set(range(len(nodes))) - set(mapping))
    if missing:
        raise RuntimeError(f"{len(missing)} devices did not check in (e.g. device {missing[0]})")
    log.info("%d devices checked in", len(mapping))
    return DeviceRegistry(mapping, reported=reported)
