"""Learned diffs during training: SparseDiff prunes to the target, HashedDiff stays projected."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedtrust.compression import (
    CompressionSettings,
    HashedDiff,
    SparseDiff,
    decode,
    encode,
    make_diff,
)


def _regression(seed: int = 0):
    """A small two-tensor linear regression problem and a model at its starting point."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=gen)
    y = x @ torch.randn(16, 4, generator=gen) + 0.5
    torch.manual_seed(seed)
    return nn.Linear(16, 4), x, y


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def _train(model, x, y, diff, steps, lr=0.05, adam=False):
    params = dict(model.named_parameters())
    optimizer = (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if hasattr(diff, "before_step"):
            diff.before_step(params)
        optimizer.step()
        diff.after_step(params, step)
        yield step, params


def test_the_pruning_schedule_ends_at_the_target_on_time():
    base = {"w": torch.zeros(1000)}
    sparse = SparseDiff(base, density=0.05, total_steps=40, prune_until=0.75, prune_events=4)
    assert sorted(sparse.schedule) == [8, 15, 23, 30]
    counts = [sparse.schedule[step] for step in sorted(sparse.schedule)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 50
    expected = [round((0.05 + 0.95 * (1 - e / 4) ** 3) * 1000) for e in (1, 2, 3)]
    assert counts[:3] == expected


def test_few_steps_dedupe_the_events():
    sparse = SparseDiff(
        {"w": torch.zeros(100)}, 0.1, total_steps=2, prune_until=0.75, prune_events=4
    )
    assert sparse.schedule == {1: sparse.schedule[1], 2: 10}
    assert sparse.schedule[1] > 10


def test_sparse_diff_training_reaches_the_target_with_a_monotone_mask():
    model, x, y = _regression()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    start = _loss(model, x, y)
    sparse = SparseDiff(base, density=0.25, total_steps=60, prune_until=0.5, prune_events=3)
    target = round(0.25 * 68)
    previous = {name: mask.clone() for name, mask in sparse.mask.items()}
    for step, params in _train(model, x, y, sparse, 60):
        for name, mask in sparse.mask.items():
            assert not (mask & ~previous[name]).any(), f"pruned entry came back at step {step}"
            assert torch.equal(params[name].detach()[~mask], base[name][~mask])
            previous[name] = mask.clone()
        if step >= 30:
            assert sum(int(m.sum()) for m in sparse.mask.values()) == target
    diff = sparse.finish(dict(model.named_parameters()))
    assert sum(int((d != 0).sum()) for d in diff.values()) == target
    assert _loss(model, x, y) < start
    shapes = {name: tuple(d.shape) for name, d in diff.items()}
    settings = CompressionSettings(method="sparse-diff", density=0.25)
    payload = encode(diff, settings, seed=0)
    decoded = decode(payload, shapes)
    assert all(torch.equal(decoded[name], diff[name]) for name in diff)
    assert sum(len(v) for k, v in payload.items() if k.endswith(".val")) == target


def test_finish_prunes_to_the_target_when_training_stops_early():
    model, x, y = _regression(1)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    sparse = SparseDiff(base, density=0.1, total_steps=100)
    for _ in _train(model, x, y, sparse, 5):
        pass
    assert sum(int(m.sum()) for m in sparse.mask.values()) == 68
    diff = sparse.finish(dict(model.named_parameters()))
    kept = sum(int(m.sum()) for m in sparse.mask.values())
    assert kept == round(0.1 * 68)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach() - base[name], diff[name])


def test_the_mask_keeps_the_globally_largest_changes():
    base = {"a": torch.zeros(10), "b": torch.zeros(10)}
    params = {"a": torch.arange(10.0), "b": 100 + torch.arange(10.0)}
    sparse = SparseDiff(base, density=0.25, total_steps=1, prune_until=1.0, prune_events=1)
    sparse.after_step(params, 1)
    assert not sparse.mask["a"].any() and int(sparse.mask["b"].sum()) == 5
    assert torch.equal(params["b"][5:], 105 + torch.arange(5.0)) and not params["a"].any()


@pytest.mark.parametrize("adam", [False, True])
def test_hashed_diff_training_stays_in_the_subspace_and_learns(adam):
    """The chain rule alone keeps SGD's and Adam's steps in the subspace (no projection)."""
    model, x, y = _regression(2)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    start = _loss(model, x, y)
    hashed = HashedDiff(base, buckets=20, seed=9)
    subspace = hashed.subspace
    for _, params in _train(model, x, y, hashed, 40, lr=0.01 if adam else 0.05, adam=adam):
        diff = {name: params[name].detach() - base[name] for name in base}
        again = subspace.expand(subspace.project(diff))
        assert all(torch.allclose(again[name], diff[name], atol=1e-6) for name in base)
    assert _loss(model, x, y) < start
    diff = hashed.finish(dict(model.named_parameters()))
    shapes = {name: tuple(d.shape) for name, d in diff.items()}
    settings = CompressionSettings(method="hashed-diff", buckets=20)
    payload = encode(diff, settings, seed=9)
    decoded = decode(payload, shapes)
    assert all(torch.allclose(decoded[name], diff[name], atol=1e-6) for name in diff)
    assert sum(v.numel() for k, v in payload.items() if k.endswith(".buckets")) == 20


@pytest.mark.parametrize("decay", [False, True])
def test_hashed_diff_under_weight_decay_ends_projected(decay):
    """Weight decay pulls weights out of the subspace: with `decay` every step is projected
    back; without, `finish` puts the diff back in it once."""
    model, x, y = _regression(4)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    hashed = HashedDiff(base, buckets=20, seed=2, decay=decay)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.5)
    for step in range(1, 21):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        hashed.before_step(params)
        optimizer.step()
        hashed.after_step(params, step)
    subspace = hashed.subspace
    drifted = {name: params[name].detach() - base[name] for name in base}
    inside = subspace.expand(subspace.project(drifted))
    stayed = all(torch.allclose(inside[n], drifted[n], atol=1e-6) for n in base)
    assert stayed == decay
    diff = hashed.finish(params)
    assert all(torch.allclose(diff[n], inside[n], atol=1e-6) for n in base)
    assert all(torch.allclose(params[n].detach(), base[n] + diff[n], atol=1e-6) for n in base)


def test_a_different_seed_would_not_carry_the_trained_diff():
    """The payload only stands for the trained diff when encoded with the training seed."""
    model, x, y = _regression(3)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    hashed = HashedDiff(base, buckets=20, seed=1)
    for _ in _train(model, x, y, hashed, 10):
        pass
    diff = hashed.finish(dict(model.named_parameters()))
    shapes = {name: tuple(d.shape) for name, d in diff.items()}
    settings = CompressionSettings(method="hashed-diff", buckets=20)
    wrong = decode(encode(diff, settings, seed=2), shapes)
    assert not all(torch.allclose(wrong[name], diff[name], atol=1e-4) for name in diff)


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("sparse-diff", SparseDiff),
        ("hashed-diff", HashedDiff),
        ("topk", type(None)),
        ("none", type(None)),
    ],
)
def test_make_diff_picks_the_constraint(method, kind):
    base = {"w": torch.zeros(50, 4)}
    settings = CompressionSettings(method=method, density=0.1)
    assert isinstance(make_diff(settings, base, total_steps=10, seed=0), kind)


def test_make_diff_derives_hashed_buckets_from_density():
    diff = make_diff(
        CompressionSettings(method="hashed-diff", density=0.1), {"w": torch.zeros(200)}, 10, 0
    )
    assert sum(diff.subspace.sizes.values()) == 20
    assert math.isclose(sum(diff.subspace.sizes.values()) / 200, 0.1)


def test_a_pruned_entry_never_comes_back_even_on_ties():
    """When every kept diff is back at zero, the next prune still picks among kept entries."""
    base = {"w": torch.zeros(20)}
    sparse = SparseDiff(base, density=0.1, total_steps=2, prune_until=1.0, prune_events=2)
    params = {"w": torch.cat([torch.zeros(16), torch.tensor([1.0, 2.0, 3.0, 4.0])])}
    sparse.after_step(params, 1)
    first = sparse.mask["w"].clone()
    assert int(first.sum()) == sparse.schedule[1] and first[16:].all()
    params["w"].zero_()
    sparse.after_step(params, 2)
    assert int(sparse.mask["w"].sum()) == 2 and not (sparse.mask["w"] & ~first).any()


def test_make_diff_projects_a_hashed_diff_every_step_only_under_weight_decay():
    base = {"w": torch.zeros(50, 4)}
    settings = CompressionSettings(method="hashed-diff", density=0.1)
    assert make_diff(settings, base, total_steps=10, seed=0, weight_decay=0.01).decay
    assert not make_diff(settings, base, total_steps=10, seed=0).decay
