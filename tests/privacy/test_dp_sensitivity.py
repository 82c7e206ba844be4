"""The sensitivity DP-SGD's accountant assumes: adding or removing one row moves the clipped
gradient sum by at most C, also for padded language-model batches."""

from __future__ import annotations

import pytest
import torch
from privacy_helpers import tiny_char_lm_task

from fedtrust.privacy import DPOptimizer
from fedtrust.privacy.grad_sample import PerSampleHooks


def _rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    lengths = [2, 3, 16, 5, 16, 2, 9, 12]  # very uneven: short rows beside full ones
    return [{"input_ids": torch.randint(1, 11, (n,), generator=g).tolist()} for n in lengths]


def _clipped_sum(model, task, rows, loss_of, reduction: str, clip: float) -> torch.Tensor:
    """The clipped per-sample gradient sum (no noise) that DP-SGD would release, flattened."""
    hooks = PerSampleHooks(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    opt = DPOptimizer(
        inner,
        hooks=hooks,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=1.0,
        loss_reduction=reduction,
    )
    batch = task.collate(rows)
    loss_of(model, batch).backward()
    opt.step()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    opt.zero_grad()
    hooks.detach()
    return flat.detach().clone()


def _largest_move(loss_of, reduction: str, clip: float) -> float:
    """Rows' gradient norms here are ~0.5-5: depending on `clip`, some are clipped, some not."""
    task = tiny_char_lm_task()
    model = task.build_model(seed=0).double().eval()  # no dropout: one gradient per row
    rows = _rows()
    full = _clipped_sum(model, task, rows, loss_of, reduction, clip)
    moves = [
        float(
            (
                full - _clipped_sum(model, task, rows[:i] + rows[i + 1 :], loss_of, reduction, clip)
            ).norm()
        )
        for i in range(len(rows))
    ]
    return max(moves)


@pytest.mark.parametrize("clip", [0.05, 1.0, 5.0])
def test_removing_any_row_of_a_padded_gpt2_batch_moves_the_clipped_sum_at_most_c(clip):
    task = tiny_char_lm_task()
    move = _largest_move(lambda m, b: task.sample_losses(m, b).sum(), "sum", clip)
    assert move <= clip * (1 + 1e-6)
    assert move > 0.5 * clip  # the bound is nearly reached: the test can see a violation


def test_the_token_mean_loss_would_break_the_bound():
    """transformers' batch token-mean rescales every row by b / (tokens in the batch)."""
    move = _largest_move(lambda m, b: m(**b).loss, "mean", 1.0)
    assert move > 1.03 * 1.0


@pytest.mark.parametrize("drop", [0, 2])
def test_a_rows_loss_does_not_depend_on_the_other_rows(drop):
    task = tiny_char_lm_task()
    model = task.build_model(seed=0).eval()
    rows = _rows()
    alone = task.sample_losses(model, task.collate([rows[drop]]))
    together = task.sample_losses(model, task.collate(rows))[drop]
    assert together.item() == pytest.approx(alone.item(), rel=1e-5)
