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

log = logging.getLogger(__name__)


class RoundCallback(Protocol):
    def on_start(self, first_round: int, last: dict[str, Any]) -> None:
        """Called once: the first round to run and the metrics row of the round before it
        (round 0's, the initial model's, on a fresh run; the checkpoint's when resuming)."""

    def on_round(self, row: dict[str, Any]) -> None:
        """Called after every round with its metrics, once its checkpoint (which keeps the row
        too, so a stop right after the checkpoint loses nothing) is written."""

    # Optional: `on_reply(server_round, done, asked, examples)` after each reply of a round
    # (`examples`: the examples the replied devices trained on), for live progress displays.


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
    timeout: float = 0.0,
    retries: int = 1,
) -> FederationResult:
    """Run (or resume from `run_dir`'s checkpoint) `rounds` rounds with `num_devices` devices.

    `device_config` goes to every device with every message (plus `server-round`); the server
    does not read it. `timeout`: seconds a round waits for its replies (0 = no limit); a device
    that has not replied by then counts as failed. A round with fewer usable replies than the
    strategy's `min_replies` is tried again with a fresh selection up to `retries` times, then
    skipped (the global model stays as it was; the row says `"skipped": true`). A round whose
    every attempt got no usable reply at all stops the run: that is a broken federation (every
    device raising the same error, say), not bad luck.
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

    for server_round in range(start, rounds + 1):
        began = time.perf_counter()
        new_arrays, train_metrics, failures = _train_round(
            grid, strategy, server_round, arrays, device_config, callbacks, timeout, retries
        )
        row = {
            "round": server_round,
            **evaluator(new_arrays or arrays),
            **{k: float(v) for k, v in (train_metrics or {}).items() if k == "train_loss"},
            **strategy.last_selection,
            **strategy.privacy(server_round),
            "failures": [f.to_json() for f in failures],
            **({"skipped": True} if new_arrays is None else {}),
            "seconds": time.perf_counter() - began,
        }
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


def _train_round(
    grid: Grid,
    strategy: DeviceSampling,
    server_round: int,
    arrays: ArrayRecord,
    device_config: ConfigRecord,
    callbacks: Sequence[RoundCallback],
    timeout: float,
    retries: int,
) -> tuple[ArrayRecord | None, Any, list[Failure]]:
    """One round's training, retried on too few replies: the new model (None: skipped), the
    training metrics and the failures of every attempt."""
    failures: list[Failure] = []
    usable_any = False
    hooks = [h for c in callbacks if (h := getattr(c, "on_reply", None)) is not None]
    for attempt in range(retries + 1):
        strategy.attempt = attempt
        # Flower's configure_train adds `server-round` to the config it sends
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(device_config), grid)
        replies = collect_replies(
            grid, messages, timeout, lambda *progress: [h(server_round, *progress) for h in hooks]
        )
        try:
            new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        except TooFewReplies as too_few:
            failures += too_few.failures
            usable_any = usable_any or too_few.usable > 0
            log.warning("%s%s", too_few, "; retrying" if attempt < retries else "; skipped")
            continue
        return new_arrays, metrics, failures + strategy.last_failures
    if not usable_any:
        reasons = describe(failures) if failures else "no device was asked"
        raise FederationError(f"round {server_round}: no usable reply in any attempt: {reasons}")
    return None, None, failures


def collect_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    on_reply: Callable[[int, int, int], Any] | None = None,
    poll: float = 0.1,
) -> list[Message]:
    """Send `messages` and gather the replies until all are in or `timeout` s have passed
    (0 = no limit), calling `on_reply(done, asked, examples)` whenever replies arrive."""
    pending = set(grid.push_messages(messages))
    asked, replies, examples = len(pending), [], 0
    deadline = time.monotonic() + timeout if timeout else float("inf")
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        if not arrived:
            time.sleep(poll)
            continue
        for msg in arrived:
            pending.discard(msg.metadata.reply_to_message_id)
            if not msg.has_error() and "device" in msg.content:
                examples += int(msg.content["device"].get("available", 0))
        replies += arrived
        if on_reply is not None:
            on_reply(len(replies), asked, examples)
    return replies
