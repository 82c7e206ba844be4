"""The server's round loop: select -> train on devices -> aggregate -> evaluate -> checkpoint.

Flower's `Strategy.start` runs a fixed loop; fedtrust keeps the same steps (the strategy's
configure/aggregate methods and `grid.send_and_receive`) in its own loop so that each round ends
with a checkpoint and a line in metrics.jsonl, and a stopped run resumes from its last round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedtrust.privacy.noise import REPRODUCIBLE_NOISE_WARNING
from fedtrust.tasks import Task, trainable_state

from .checkpoint import load_checkpoint, save_checkpoint
from .evaluation import CentralEvaluator
from .registry import check_in
from .selection import make_selection
from .strategy import make_strategy

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
AUDIT_FILE = "privacy_audit.json"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_rounds(run_dir: Path, last_round: int) -> None:
    """Drop metric lines of rounds after the checkpoint (a crash may have left one)."""
    rows = [r for r in read_metrics(run_dir) if r["round"] <= last_round]
    (run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_federation(
    grid: Grid,
    cfg,
    run_dir: Path,
    task: Task,
    num_devices: int,
    metadata: Callable[[int], np.ndarray] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Run (or resume) `cfg.server.rounds` rounds; returns the final full-test metrics."""
    message_config = ConfigRecord({"fedtrust-config": json.dumps(cfg.to_dict())})
    registry = check_in(grid, message_config, expected=num_devices, timeout=timeout)
    registry.metadata = metadata
    strategy = make_strategy(cfg, registry, make_selection(cfg.selection))
    evaluator = CentralEvaluator(
        task, cfg.run.seed, cfg.server.eval_examples, cfg.server.eval_batch_size
    )

    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        arrays = ArrayRecord({k: v.clone() for k, v in trainable_state(evaluator.model).items()})
        start = 1
        (run_dir / METRICS).write_text("")
        _append(run_dir, {"round": 0, **evaluator(arrays), "seconds": 0.0})
    else:
        last, saved, state, extra = checkpoint
        arrays = ArrayRecord({k: Array(v) for k, v in saved.items()})
        strategy.load_state(state)
        registry.privacy = {int(d): p for d, p in extra.get("privacy", {}).items()}
        _keep_rounds(run_dir, last)
        start = last + 1
        log.info("resuming after round %d", last)

    for server_round in range(start, cfg.server.rounds + 1):
        began = time.perf_counter()
        messages = strategy.configure_train(
            server_round, arrays, ConfigRecord(message_config), grid
        )
        replies = grid.send_and_receive(messages, timeout=timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        arrays = new_arrays or arrays
        row = {
            "round": server_round,
            **evaluator(arrays),
            **{k: float(v) for k, v in (train_metrics or {}).items() if k == "train_loss"},
            **strategy.last_selection,
            **_privacy_metrics(strategy, registry, server_round, cfg.privacy),
            "seconds": time.perf_counter() - began,
        }
        _append(run_dir, row)
        arrays_np = {k: v.numpy() for k, v in arrays.items()}
        extra = {"privacy": registry.privacy}
        save_checkpoint(run_dir, server_round, arrays_np, strategy.state(), extra)
        if on_round:
            on_round(row)

    final = evaluator(arrays, full=True)
    task.save(evaluator.model, run_dir / "model")
    audit = getattr(strategy, "one_run_audit", lambda rounds: None)(cfg.server.rounds)
    if audit is not None:  # user-level DP with canary devices: claimed vs audited ε
        (run_dir / AUDIT_FILE).write_text(json.dumps(audit, indent=1))
    if registry.privacy:  # per-device sample-level DP: each device's own ε
        per_device = {str(d): registry.privacy[d] for d in sorted(registry.privacy)}
        (run_dir / "device_privacy.json").write_text(json.dumps(per_device, indent=1))
    return final


def _privacy_metrics(strategy, registry, server_round: int, privacy) -> dict[str, Any]:
    """ε so far with its δ, neighbouring relation and accountant: the server's (user-level
    DP) or the devices' (sample-level DP, the worst device)."""
    if not privacy.enabled:
        return {}
    if hasattr(strategy, "epsilon"):
        out = dict(strategy.epsilon(server_round))
    else:  # each device reports its ε with its δ, relation and accountant
        out = registry.epsilon_summary()
    if privacy.reproducible_noise:
        out["noise"] = REPRODUCIBLE_NOISE_WARNING
    return out


def _append(run_dir: Path, row: dict[str, Any]) -> None:
    with (run_dir / METRICS).open("a") as f:
        f.write(json.dumps(row) + "\n")
