"""HashedSubspace: a reproducible subspace, and project/expand as its orthogonal projection."""

from __future__ import annotations

import pytest
import torch

from fedtrust.compression import HashedSubspace
from fedtrust.compression.hashing import split_buckets

SHAPES = {"a.weight": (30, 20), "a.bias": (20,), "b.weight": (7, 3, 5), "tiny": (1,)}


def _random(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(*shape, generator=gen, dtype=torch.float64)
        for name, shape in shapes.items()
    }


def _dot(u, v):
    return sum(float((u[name] * v[name]).sum()) for name in u)


def _minus(u, v):
    return {name: u[name] - v[name] for name in u}


@pytest.mark.parametrize("buckets", [4, 37, 200, 725])
def test_buckets_split_over_tensors_in_proportion(buckets):
    """The smallest tensors are sent exactly while they fit in half the buckets; the others
    share the rest in proportion to their size."""
    numels = {name: int(torch.tensor(shape).prod()) for name, shape in SHAPES.items()}
    sizes = split_buckets(numels, buckets)
    assert sum(sizes.values()) == buckets
    assert all(sizes[name] >= 1 for name in numels)
    ascending = sorted(numels, key=numels.get)
    exact = [name for name in ascending if sizes[name] == numels[name]]
    assert exact == ascending[: len(exact)]
    assert sum(numels[n] for n in exact) <= buckets // 2
    if len(exact) < len(ascending):
        assert sum(numels[n] for n in ascending[: len(exact) + 1]) > buckets // 2
    hashed = [name for name in numels if name not in exact]
    share, total = buckets - sum(sizes[n] for n in exact), sum(numels[n] for n in hashed)
    for name in hashed:
        assert abs(sizes[name] - 1 - (share - len(hashed)) * numels[name] / total) < 1
    reordered = split_buckets(dict(reversed(list(numels.items()))), buckets)
    assert reordered == sizes


def test_a_new_head_is_sent_exactly_once_the_buckets_leave_room():
    numels = {"encoder": 100_000, "head": 5_000, "head.bias": 50}
    assert split_buckets(numels, 1_000)["head"] < 5_000  # 1 %: hashed
    sizes = split_buckets(numels, 12_000)
    assert sizes["head"] == 5_000 and sizes["head.bias"] == 50 and sizes["encoder"] == 6_950


def test_projection_is_idempotent_and_the_residual_is_orthogonal():
    subspace = HashedSubspace(SHAPES, 60, seed=3)
    u = _random(SHAPES, 0)
    projected = subspace.expand(subspace.project(u))
    twice = subspace.expand(subspace.project(projected))
    assert all(torch.allclose(twice[name], projected[name]) for name in u)
    residual = _minus(u, projected)
    for seed in range(5):
        direction = subspace.expand(_random({n: (s,) for n, s in subspace.sizes.items()}, seed))
        assert abs(_dot(residual, direction)) < 1e-9 * (1 + _dot(u, u))


def test_the_projection_is_the_closest_point_of_the_subspace():
    subspace = HashedSubspace(SHAPES, 60, seed=4)
    u = _random(SHAPES, 1)
    best = subspace.project(u)
    gap = _dot(_minus(u, subspace.expand(best)), _minus(u, subspace.expand(best)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        other = {
            n: b + 0.1 * torch.randn(b.shape, generator=gen, dtype=b.dtype) for n, b in best.items()
        }
        moved = _minus(u, subspace.expand(other))
        assert _dot(moved, moved) > gap


def test_project_inverts_expand_on_occupied_buckets():
    subspace = HashedSubspace(SHAPES, 600, seed=5)  # some buckets stay empty
    values = _random({n: (s,) for n, s in subspace.sizes.items()}, 2)
    back = subspace.project(subspace.expand(values))
    expanded = subspace.expand(values)
    for name in values:
        # a bucket is occupied when its (distinct, random) value shows up in the expansion
        hit = torch.isin(values[name].abs(), expanded[name].abs().reshape(-1))
        assert torch.allclose(back[name][hit], values[name][hit])
        assert (back[name][~hit] == 0).all()
    assert any((~torch.isin(v.abs(), expanded[n].abs())).any() for n, v in values.items())


def test_expanded_entries_are_signed_copies_of_bucket_values():
    subspace = HashedSubspace(SHAPES, 12, seed=6)
    values = {
        n: torch.arange(1, s + 1, dtype=torch.float64) * 10 ** len(n)
        for n, s in subspace.sizes.items()
    }
    for name, tensor in subspace.expand(values).items():
        magnitudes = set(tensor.abs().reshape(-1).tolist())
        assert magnitudes <= set(values[name].tolist())
        signs = tensor.sign().reshape(-1)
        if tensor.numel() > 20:
            assert (signs > 0).any() and (signs < 0).any()


def test_the_hash_depends_on_the_seed_only():
    values = {n: torch.ones(s) for n, s in HashedSubspace(SHAPES, 50, seed=0).sizes.items()}
    first = HashedSubspace(SHAPES, 50, seed=7).expand(values)
    again = HashedSubspace(dict(reversed(list(SHAPES.items()))), 50, seed=7).expand(values)
    other = HashedSubspace(SHAPES, 50, seed=8).expand(values)
    assert all(torch.equal(first[n], again[n]) for n in SHAPES)
    assert not torch.equal(first["a.weight"], other["a.weight"])
