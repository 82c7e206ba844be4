"""What the server knows about devices: which node is which device (the roster), how much data
each holds (counts), and what each reported about its own privacy budget (the ledger).

Devices check in once (a query message at the start of a run); after that the server never asks
the whole population again. Per-round counts come from device metadata: the simulated
population's schedule when there is one, else the count each device reported the last time it
took part.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtrust.errors import FederationError

log = logging.getLogger(__name__)


@dataclass
class DevicePrivacy:
    """A device's own report of its sample-level DP budget (it keeps the accountant history)."""

    epsilon: float
    delta: float
    relation: str
    accountant: str
    participations: int
    exhausted: bool

    @classmethod
    def from_reply(cls, info: ConfigRecord) -> DevicePrivacy:
        return cls(
            epsilon=float(info["epsilon"]),
            delta=float(info["delta"]),
            relation=str(info["relation"]),
            accountant=str(info["accountant"]),
            participations=int(info["participations"]),
            exhausted=bool(info["budget-exhausted"]),
        )


class PrivacyLedger:
    """Sample-level DP: each device's latest report, the run's worst ε, who is out of budget."""

    def __init__(self, devices: dict[int, DevicePrivacy] | None = None) -> None:
        self.devices = dict(devices or {})

    def exhausted(self) -> list[int]:
        return [d for d, p in self.devices.items() if p.exhausted]

    def summary(self) -> dict[str, Any]:
        """The largest and the mean ε over devices that trained so far ({} before any)."""
        if not self.devices:
            return {}
        worst = max(self.devices.values(), key=lambda p: p.epsilon)
        return {
            "epsilon": worst.epsilon,
            "delta": worst.delta,
            "relation": worst.relation,
            "accountant": worst.accountant,
            "epsilon_mean": float(np.mean([p.epsilon for p in self.devices.values()])),
            "devices_out_of_budget": len(self.exhausted()),
        }

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {str(d): dataclasses.asdict(self.devices[d]) for d in sorted(self.devices)}

    @classmethod
    def from_json(cls, data: dict[str, dict[str, Any]]) -> PrivacyLedger:
        return cls({int(d): DevicePrivacy(**p) for d, p in data.items()})


QUERY = MessageType.QUERY


class DeviceRegistry:
    def __init__(
        self,
        node_of_device: dict[int, int] | None = None,
        metadata: Callable[[int], np.ndarray] | None = None,
        reported: dict[int, int] | None = None,
    ) -> None:
        self.node_of_device = dict(node_of_device or {})
        self.metadata = metadata
        self.reported = dict(reported or {})
        self.ledger = PrivacyLedger()

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
                raise FederationError(f"metadata has {len(counts)} devices, {self.size} checked in")
        else:
            counts = np.asarray([self.reported.get(d, 0) for d in range(self.size)])
        spent = self.ledger.exhausted()
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
                    self.ledger.devices[device] = DevicePrivacy.from_reply(info)

    def check_in(
        self,
        grid: Grid,
        config: ConfigRecord,
        expected: int,
        timeout: float = 600.0,
        chunk: int = 1000,
    ) -> None:
        """Wait for `expected` nodes, then ask each once which device it is and what it holds.

        The questions go out `chunk` at a time: a grid's reply polling checks every message
        still pending, so one batch of 100,000 would cost O(N^2); chunks keep it O(N).
        """
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < expected:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(nodes)} of {expected} devices connected in {timeout} s"
                )
            time.sleep(0.2)
        config = ConfigRecord({**config, "server-round": 1})
        replies: list[Message] = []
        for start in range(0, len(nodes), chunk):
            messages = [
                Message(RecordDict({"config": config}), dst_node_id=n, message_type=QUERY)
                for n in nodes[start : start + chunk]
            ]
            replies += grid.send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.has_error():
                raise FederationError(f"device check-in failed: {reply.error.reason}")
            info = reply.content["device"]
            self.node_of_device[int(info["device"])] = reply.metadata.src_node_id
            self.reported[int(info["device"])] = int(info["available"])
        missing = sorted(set(range(len(nodes))) - set(self.node_of_device))
        if missing:
            raise FederationError(
                f"{len(missing)} devices did not check in (e.g. device {missing[0]})"
            )
        log.info("%d devices checked in", self.size)
