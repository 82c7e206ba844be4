"""TensorBoard events of a run's per-round metrics (`run.tensorboard = true`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLog:
    """Round callback: every numeric metric of every round as a TensorBoard scalar."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_start(self, first_round: int, last: dict[str, Any]) -> None:
        raise NotImplementedError("TensorBoard logging is not built yet")

    def on_round(self, row: dict[str, Any]) -> None:
        raise NotImplementedError("TensorBoard logging is not built yet")
