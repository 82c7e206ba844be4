"""DP randomness: by default nobody holding the config or seed can replay a device's noise."""

from __future__ import annotations

import copy

import torch
from privacy_helpers import tiny_char_lm_task
from torch.utils.data import DataLoader

from fedtrust.clients.settings import ClientSettings
from fedtrust.clients.train import LocalDP, train_local
from fedtrust.privacy import poisson_loader
from fedtrust.tasks import trainable_state

SIGMA, CLIP = 10.0, 1.0


def _setup():
    task = tiny_char_lm_task()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 11, (12,), generator=g).tolist()} for _ in range(40)]
    model = task.build_model(seed=0).eval()
    cfg = ClientSettings(epochs=1, batch_size=8, optimizer="sgd", lr=0.1, head_lr_scale=1.0)
    return task, rows, model, cfg


def _update(task, rows, model, cfg, reproducible: bool, seed: int = 7) -> torch.Tensor:
    local = copy.deepcopy(model)
    before = {k: v.clone() for k, v in trainable_state(local).items()}
    dp = LocalDP(max_grad_norm=CLIP, delta=1e-5, noise_multiplier=SIGMA, reproducible=reproducible)
    result = train_local(local, task, rows, cfg, seed, dp)
    assert result.steps == 5 and result.spent == [(SIGMA, 1 / 5, 5)]
    after = trainable_state(local)
    return torch.cat([(after[k] - before[k]).reshape(-1) for k in before])


def test_default_noise_is_not_replayed_by_someone_holding_the_seed():
    task, rows, model, cfg = _setup()
    released = _update(task, rows, model, cfg, reproducible=False)
    replay = _update(task, rows, model, cfg, reproducible=True)  # the attacker's best replay
    again = _update(task, rows, model, cfg, reproducible=False)
    # the noise dominates the update; a replay leaves all of it in place
    assert float((released - replay).norm() / released.norm()) > 0.5
    assert float((released - again).norm() / released.norm()) > 0.5


def test_reproducible_noise_is_replayed_exactly_so_it_is_reported_as_no_privacy():
    task, rows, model, cfg = _setup()
    first = _update(task, rows, model, cfg, reproducible=True)
    second = _update(task, rows, model, cfg, reproducible=True)
    assert torch.equal(first, second)
    other_seed = _update(task, rows, model, cfg, reproducible=True, seed=8)
    assert not torch.equal(first, other_seed)


def test_poisson_batches_are_not_drawn_from_the_users_loader_generator():
    def batches() -> list[list[int]]:
        loader = DataLoader(
            list(range(200)), batch_size=20, generator=torch.Generator().manual_seed(0)
        )
        return [b.tolist() for b in poisson_loader(loader)]

    assert batches() != batches()
