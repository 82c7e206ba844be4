"""Local training on a device: what it reports, also when its privacy budget runs out."""

from __future__ import annotations

import math

import numpy as np
import pytest
from privacy_helpers import tiny_char_lm_task

from fedtrust.clients.settings import ClientSettings
from fedtrust.clients.train import LocalDP, train_local
from fedtrust.tasks.lm import CharLMTask


def _task_and_rows(n: int = 48) -> tuple[CharLMTask, list[dict]]:
    task = tiny_char_lm_task()
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(1, 11, size=12).tolist()} for _ in range(n)]
    return task, rows


def test_steps_before_the_budget_ran_out_are_reported():
    task, rows = _task_and_rows()
    settings = ClientSettings(epochs=50, batch_size=8, lr=1e-2, head_lr_scale=1.0, num_cpus=1)
    dp = LocalDP(max_grad_norm=1.0, delta=1e-3, target_epsilon=3.0, noise_multiplier=1.0)
    result = train_local(task.build_model(0), task, rows, settings, seed=0, dp=dp)
    planned = settings.epochs * math.ceil(len(rows) / settings.batch_size)
    assert result.budget_exhausted
    assert 0 < result.steps < planned  # stopped early, and says how far it got
    assert math.isfinite(result.train_loss) and result.train_loss > 0
    assert result.epsilon <= 3.0 + 1e-9
    assert result.spent and result.spent[0][2] == result.steps  # the steps it accounts for


@pytest.mark.parametrize("steps", [3, 0])
def test_plain_training_counts_its_steps_and_loss(steps):
    task, rows = _task_and_rows(16)
    settings = ClientSettings(epochs=2, steps=steps, batch_size=8, num_cpus=1)
    result = train_local(task.build_model(0), task, rows, settings, seed=0)
    assert result.steps == (steps or 2 * 2)
    assert math.isfinite(result.train_loss) and result.epsilon == 0.0
