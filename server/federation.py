"""The server's round loop: select -> train on devices -> aggregate -> evaluate -> checkpoint.

Flower's `Strategy.start` runs a fixed loop; fedtrust keeps the same steps (the strategy's
configure/aggregate methods and `grid.send_and_receive`) in its own loop so that each round ends
with a checkpoint, and a stopped run resumes from its last round. What happens with each round's
metrics (a metrics file, a progress line) is up to the callbacks the caller passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedtrust.errors import FederationError
from fedtrust.tasks import trainable_state

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .evaluation import CentralEvaluator
from .registry import DeviceRegistry, PrivacyLedger
from .replies import Failure, TooFewReplies, describe
from .strategy import DeviceSampling
from .wire import message_bytes

log = logging.getLogger(__name__)


class RoundCallback(Protocol):
    def on_start(self, first_round: int, last: dict[str, Any]) -> None:
        """Called once: the first round to run and the metrics row of the round before it
        (round 0's, the initial model's, on a fresh run; the checkpoint's when resuming)."""

    def on_round(self, row: dict[str, Any]) -> None:
        """Called after every round with its metrics, once its checkpoint (which keeps the row
        too, so a stop right after the checkpoint loses nothing) is written."""

    # Optional: `on_reply(server_round, done, asked, examples, seconds)` whenever replies of a
    # round arrive (`examples`: held by the devices that replied; `seconds` since the round's
    # messages went out), for live progress displays.


@dataclass
class FederationResult:
    final: dict[str, Any]  # metrics of the final model on the whole test split
    arrays: dict[str, np.ndarray]  # the final model's trainable tensors
    device_privacy: dict[str, dict[str, Any]]  # sample-level DP: each device's own report
    audit: dict[str, Any] | None  # user-level DP with canary devices: claimed vs audited ε


def run_federation(
    grid: Grid,
    strategy: DeviceSampling,
    evaluator: CentralEvaluator,
    run_dir: Path,
    *,
    rounds: int,
    num_devices: int,
    device_config: ConfigRecord,
    callbacks: Sequence[RoundCallback] = (),
    timeout: float = 3600.0,
    retries: int = 1,
) -> FederationResult:
    """Run (or resume from `run_dir`'s checkpoint) `rounds` rounds with `num_devices` devices.

    `device_config` goes to every device with every message (plus `server-round`); the server
    does not read it. `timeout`: seconds a round waits for its replies (0 = no limit); a device
    that has not replied by then counts as failed (and stays busy: `RoundTrainer`). A round
    with fewer usable replies than the strategy's `min_replies` is tried again with a fresh
    selection up to `retries` times, then skipped (the global model stays as it was; the row
    says `"skipped": true`). A round whose every attempt got no usable reply at all stops the
    run: that is a broken federation (every device raising the same error, say), not bad luck.
    """
    registry: DeviceRegistry = strategy.registry
    registry.check_in(grid, device_config, expected=num_devices)  # not the round timeout
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        arrays = ArrayRecord({k: v.clone() for k, v in trainable_state(evaluator.model).items()})
        start = 1
        last: dict[str, Any] = {"round": 0, **evaluator(arrays), "seconds": 0.0}
    else:
        arrays = ArrayRecord({k: Array(v) for k, v in checkpoint.arrays.items()})
        strategy.load_state(checkpoint.strategy_state)
        registry.ledger = PrivacyLedger.from_json(checkpoint.device_privacy)
        start, last = checkpoint.round + 1, checkpoint.metrics
        log.info("resuming after round %d", checkpoint.round)
    for callback in callbacks:
        callback.on_start(start, last)

    trainer = RoundTrainer(grid, strategy, device_config, callbacks, timeout, retries)
    for server_round in range(start, rounds + 1):
        began = time.perf_counter()
        phases = {"devices": 0.0, "aggregate": 0.0}
        traffic = {"uplink_bytes": 0, "downlink_bytes": 0}
        new_arrays, train_metrics, failures = trainer.train(server_round, arrays, phases, traffic)
        evaluated = time.perf_counter()
        row = {
            "round": server_round,
            **evaluator(new_arrays or arrays),
            **{k: float(v) for k, v in (train_metrics or {}).items() if k == "train_loss"},
            **strategy.last_selection,
            **strategy.privacy(server_round),
            "failures": [f.to_json() for f in failures],
            **({"skipped": True} if new_arrays is None else {}),
            **traffic,
            "seconds": time.perf_counter() - began,
        }
        row["phases"] = phases | {"evaluate": began + row["seconds"] - evaluated}
        arrays = new_arrays or arrays
        arrays_np = {k: v.numpy() for k, v in arrays.items()}
        ledger = registry.ledger.to_json()
        save_checkpoint(run_dir, Checkpoint(server_round, arrays_np, strategy.state(), ledger, row))
        for callback in callbacks:
            callback.on_round(row)

    return FederationResult(
        final=evaluator(arrays, full=True),
        arrays={k: v.numpy() for k, v in arrays.items()},
        device_privacy=registry.ledger.to_json(),
        audit=strategy.one_run_audit(rounds),
    )


class RoundTrainer:
    """One round's training on the devices: select, send, wait, screen and aggregate; retried
    with a fresh selection (without the devices that just failed) when too few replies are
    usable. Messages the server stopped waiting for (`timeout`) keep their devices busy, out of
    every selection, until their late reply comes in and is thrown away: a device never trains
    on two messages at once (its DP budget file would race)."""

    def __init__(
        self,
        grid: Grid,
        strategy: DeviceSampling,
        device_config: ConfigRecord,
        callbacks: Sequence[RoundCallback],
        timeout: float,
        retries: int,
    ) -> None:
        self.grid, self.strategy, self.device_config = grid, strategy, device_config
        self.timeout, self.retries = timeout, retries
        strategy.round_timeout = timeout
        self.hooks = [h for c in callbacks if (h := getattr(c, "on_reply", None)) is not None]
        self.device_of_node = {n: d for d, n in strategy.registry.node_of_device.items()}
        self.abandoned: dict[str, int] = {}  # message id -> node, for messages given up on

    def train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        phases: dict[str, float],
        traffic: dict[str, int] | None = None,
    ) -> tuple[ArrayRecord | None, Any, list[Failure]]:
        """The new model (None: skipped), the training metrics and every attempt's failures;
        adds the seconds spent on the devices (sending included) and aggregating to `phases`,
        and the serialised bytes sent and received (every attempt's) to `traffic`."""
        failures: list[Failure] = []
        usable_any = False
        traffic = traffic if traffic is not None else {"uplink_bytes": 0, "downlink_bytes": 0}
        for attempt in range(self.retries + 1):
            self.strategy.attempt = attempt
            self.strategy.unavailable = self._busy() | {f.device for f in failures}
            began = time.perf_counter()
            # Flower's configure_train adds `server-round` to the config it sends
            config = ConfigRecord(self.device_config)
            messages = list(self.strategy.configure_train(server_round, arrays, config, self.grid))
            traffic["downlink_bytes"] += message_bytes(messages)
            replies, pending = collect_replies(
                self.grid,
                messages,
                self.timeout,
                lambda *progress: [h(server_round, *progress) for h in self.hooks],
            )
            self.abandoned |= pending
            traffic["uplink_bytes"] += message_bytes(replies)
            received = time.perf_counter()
            phases["devices"] += received - began
            try:
                new_arrays, metrics = self.strategy.aggregate_train(server_round, replies)
            except TooFewReplies as too_few:
                phases["aggregate"] += time.perf_counter() - received
                failures += too_few.failures
                usable_any = usable_any or too_few.usable > 0
                log.warning(
                    "%s%s", too_few, "; retrying" if attempt < self.retries else "; skipped"
                )
                continue
            phases["aggregate"] += time.perf_counter() - received
            return new_arrays, metrics, failures + self.strategy.last_failures
        if not usable_any:
            reasons = describe(failures) if failures else "no device was asked"
            raise FederationError(
                f"round {server_round}: no usable reply in any attempt: {reasons}"
            )
        return None, None, failures

    def _busy(self) -> set[int]:
        """Devices still working on a message the server gave up on (late replies discarded)."""
        if self.abandoned:
            for msg in self.grid.pull_messages(set(self.abandoned)):
                self.abandoned.pop(msg.metadata.reply_to_message_id, None)
        return {self.device_of_node[n] for n in self.abandoned.values() if n in self.device_of_node}


def collect_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    on_reply: Callable[[int, int, int, float], Any] | None = None,
    poll: float = 0.1,
) -> tuple[list[Message], dict[str, int]]:
    """Send `messages` and gather the replies until all are in or `timeout` s have passed
    (0 = no limit), calling `on_reply(done, asked, examples, seconds)` whenever replies arrive
    (`examples`: held by the devices that replied). Returns the replies and the messages still
    unanswered (message id -> node)."""
    messages = list(messages)
    began = time.monotonic()
    ids = list(grid.push_messages(messages))
    pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages)}
    asked, replies, examples = len(pending), [], 0
    deadline = began + timeout if timeout else float("inf")
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(set(pending)))
        if not arrived:
            time.sleep(poll)
            continue
        for msg in arrived:
            pending.pop(msg.metadata.reply_to_message_id, None)
            if not msg.has_error() and "device" in msg.content:
                examples += int(msg.content["device"].get("available", 0))
        replies += arrived
        if on_reply is not None:
            on_reply(len(replies), asked, examples, time.monotonic() - began)
    return replies, pending
