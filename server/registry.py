"""What the server knows about devices: which node is which device, and how much data each holds.

Devices check in once (a query message at the start of a run); after that the server never asks the
whole population again. Per-round counts come from device metadata: the simulated population's
schedule when there is one, else the count each device reported the last time it took part.
"""

from __future__ import annotations

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
        # Sample-level DP: what each device reported about its own budget (epsilon, delta,
        # participations, exhausted). Devices keep their accountant history themselves.
        self.privacy: dict[int, dict] = {}

    @property
    def size(self) -> int:
        return len(self.node_of_device)

    def counts(self, server_round: int) -> np.ndarray:
        """Available examples per device (index = device id) for `server_round`.

        A device that reported its sample-level DP budget used up counts as holding nothing.
        """
        if self.metadata is not None:
            counts = np.asarray(self.metadata(server_round))
            if len(counts) != self.size:
                raise RuntimeError(f"metadata has {len(counts)} devices, {self.size} checked in")
        else:
            counts = np.asarray([self.reported.get(d, 0) for d in range(self.size)])
        spent = [d for d, p in self.privacy.items() if p["exhausted"]]
        if spent:
            counts = counts.copy()
            counts[spent] = 0
        return counts

    def update(self, replies: Iterable[Message]) -> None:
        """Refresh counts (and DP budget reports) from the replies of the devices that took part."""
        for msg in replies:
            if not msg.has_error() and "device" in msg.content:
                info = msg.content["device"]
                device = int(info["device"])
                self.reported[device] = int(info["available"])
                if "epsilon" in info:
                    self.privacy[device] = {
                        "epsilon": float(info["epsilon"]),
                        "delta": float(info["delta"]),
                        "relation": str(info["relation"]),
                        "accountant": str(info["accountant"]),
                        "participations": int(info["participations"]),
                        "exhausted": bool(info["budget-exhausted"]),
                    }

    def epsilon_summary(self) -> dict[str, float]:
        """Sample-level DP: the largest and the mean ε over devices that trained so far."""
        if not self.privacy:
            return {}
        worst = max(self.privacy.values(), key=lambda p: p["epsilon"])
        return {
            "epsilon": worst["epsilon"],
            "delta": worst["delta"],
            "relation": worst["relation"],
            "accountant": worst["accountant"],
            "epsilon_mean": float(np.mean([p["epsilon"] for p in self.privacy.values()])),
            "devices_out_of_budget": sum(p["exhausted"] for p in self.privacy.values()),
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
