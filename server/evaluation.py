"""Central evaluation of the global model on the server's held-out split."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedtrust.tasks import Task, load_trainable_state


class CentralEvaluator:
    """Evaluates on a fixed random subset every round (cheap) and on everything at the end."""

    def __init__(self, task: Task, seed: int, subset: int, batch_size: int = 256) -> None:
        self.task, self.batch_size = task, batch_size
        self.model = task.build_model(seed)
        rows = task.test
        if 0 < subset < len(rows):
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), subset, replace=False))
            rows = [rows[i] for i in keep]
        self.rows = rows

    def __call__(self, arrays: ArrayRecord, full: bool = False) -> dict[str, Any]:
        load_trainable_state(self.model, arrays.to_torch_state_dict())
        rows = self.task.test if full else self.rows
        return self.task.evaluate(self.model, rows, self.batch_size)
