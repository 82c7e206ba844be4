"""The server's round loop: select -> train on devices -> aggregate -> evaluate -> checkpoint.

Flower's `Strategy.start` runs a fixed loop; fedtrust keeps the same steps (the strategy's
configure/aggregate methods and `grid.send_and_receive`) in its own loop so that each round ends
with a checkpoint, and a stopped run resumes from its last round. What happens with each round's
metrics (a metrics file, a progress line) is up to the callbacks the caller passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedtrust.tasks import trainable_state

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .evaluation import CentralEvaluator
from .registry import DeviceRegistry, PrivacyLedger
from .strategy import DeviceSampling

log = logging.getLogger(__name__)


class RoundCallback(Protocol):
    def on_start(self, first_round: int, last: dict[str, Any]) -> None:
        """Called once: the first round to run and the metrics row of the round before it
        (round 0's, the initial model's, on a fresh run; the checkpoint's when resuming)."""

    def on_round(self, row: dict[str, Any]) -> None:
        """Called after every round with its metrics, once its checkpoint (which keeps the row
        too, so a stop right after the checkpoint loses nothing) is written."""


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
) -> FederationResult:
    """Run (or resume from `run_dir`'s checkpoint) `rounds` rounds with `num_devices` devices.

    `device_config` goes to every device with every message (plus `server-round`); the server
    does not read it.
    """
    registry: DeviceRegistry = strategy.registry
    registry.check_in(grid, device_config, expected=num_devices, timeout=timeout)
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
        # Flower's configure_train adds `server-round` to the config it sends
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(device_config), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        arrays = new_arrays or arrays
        row = {
            "round": server_round,
            **evaluator(arrays),
            **{k: float(v) for k, v in (train_metrics or {}).items() if k == "train_loss"},
            **strategy.last_selection,
            **strategy.privacy(server_round),
            "seconds": time.perf_counter() - began,
        }
        arrays_np = {k: v.numpy() for k, v in arrays.items()}
        ledger = registry.ledger.to_json()
        save_checkpoint(
            run_dir, Checkpoint(server_round, arrays_np, strategy.state(), ledger, row)
        )
        for callback in callbacks:
            callback.on_round(row)

    return FederationResult(
        final=evaluator(arrays, full=True),
        arrays={k: v.numpy() for k, v in arrays.items()},
        device_privacy=registry.ledger.to_json(),
        audit=strategy.one_run_audit(rounds),
    )
