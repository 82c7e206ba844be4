"""TensorBoard events of a run's per-round metrics (`run.tensorboard = true`).

`tensorboard --logdir runs` then shows every run's curves side by side: one scalar per numeric
metric of metrics.jsonl (tag = its key, nested dicts as `key/subkey`), step = round (0 = the
initial model). Lists (the chosen devices...), strings and flags are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_FOLDER = "tensorboard"


class TensorBoardLog:
    """Round callback: every numeric metric of every round as a TensorBoard scalar."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.log_dir = run_dir / TENSORBOARD_FOLDER
        self.writer: SummaryWriter | None = None

    def on_start(self, first_round: int, last: dict[str, Any]) -> None:
        # A resumed run (first_round > 1) hides every step from the checkpoint's round on that
        # an earlier process wrote (purge_step), then writes the checkpoint's row again: each
        # round appears once, whether the stop came before or after its events were written.
        if first_round == 1 or last:
            purge = None if first_round == 1 else first_round - 1
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge)
            self.on_round(last)
        else:  # a checkpoint written before checkpoints kept their row: keep that round's events
            self.writer = SummaryWriter(str(self.log_dir), purge_step=first_round)

    def on_round(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            raise RuntimeError("TensorBoardLog.on_round before on_start")
        step = int(row["round"])
        for tag, value in scalars(row):
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a stopped run keeps every finished round's events

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def scalars(row: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The (tag, value) pairs of a metrics row worth a scalar: numbers other than the round
    number and booleans, nested dicts flattened as `key/subkey`."""
    for key, value in row.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, prefix=f"{tag}/")
        elif tag != "round" and isinstance(value, int | float) and not isinstance(value, bool):
            yield tag, float(value)
