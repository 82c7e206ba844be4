import numpy as np
import pytest

from fedtrust.simulations.partition import PartitionError, dirichlet, iid, natural, powerlaw


def _is_exact_cover(parts, n):
    joined = np.concatenate(parts)
    return len(joined) == n and len(np.unique(joined)) == n


def test_iid_is_an_even_exact_cover_and_deterministic():
    parts = iid(1003, 10, seed=1)
    assert _is_exact_cover(parts, 1003)
    assert {len(p) for p in parts} <= {100, 101}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid(1003, 10, seed=1)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid(1003, 10, seed=2)))


def _mean_label_entropy(parts, labels):
    ent = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=labels.max() + 1) / len(p)
        freq = freq[freq > 0]
        ent.append(-(freq * np.log(freq)).sum())
    return float(np.mean(ent))


def test_dirichlet_skews_labels_more_as_alpha_shrinks():
    labels = np.repeat(np.arange(20), 100)
    skewed = dirichlet(labels, 20, alpha=0.1, seed=0)
    mild = dirichlet(labels, 20, alpha=100.0, seed=0)
    assert _is_exact_cover(skewed, len(labels)) and _is_exact_cover(mild, len(labels))
    assert all(len(p) > 0 for p in skewed)
    assert _mean_label_entropy(skewed, labels) < _mean_label_entropy(mild, labels) - 1.0


def test_powerlaw_gives_skewed_sizes():
    parts = powerlaw(10_000, 100, exponent=1.0, seed=0)
    sizes = np.sort([len(p) for p in parts])
    assert _is_exact_cover(parts, 10_000)
    assert sizes[0] >= 1
    assert sizes[-1] > 10 * np.median(sizes)


def test_natural_groups_by_user_and_drops_small_users():
    devices = ["a", "b", "a", "c", "a", "b"]
    parts, names = natural(devices, min_examples=2)
    assert names == ["a", "b"]
    assert [p.tolist() for p in parts] == [[0, 2, 4], [1, 5]]


def test_errors():
    with pytest.raises(PartitionError, match="num_devices = 11 is more than the 10"):
        iid(10, 11, seed=0)
    with pytest.raises(PartitionError, match="device column"):
        natural(["a", None])
