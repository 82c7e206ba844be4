"""largest / largest_mask: exactly a top-k, whichever path (sampled bracket or full top-k)."""

from __future__ import annotations

import pytest
import torch

from fedtrust.compression.selection import SAMPLE, largest, largest_mask

N = 8 * SAMPLE + 1000  # long enough for the sampled bracket


def _is_a_topk(scores: torch.Tensor, chosen: torch.Tensor, count: int) -> bool:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[chosen] = True
    if int(mask.sum()) != count or chosen.unique().numel() != count:
        return False
    return count in (0, scores.numel()) or bool(scores[mask].min() >= scores[~mask].max())


@pytest.mark.parametrize("count", [1, 57, N // 100, N // 3, N // 2 + 7, N - 1])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_largest_is_exactly_a_topk_sorted(count, kind):
    gen = torch.Generator().manual_seed(count)
    if kind == "normal":
        scores = torch.randn(N, generator=gen).abs()
    else:  # three distinct values: the k-th largest sits inside a huge tie
        scores = torch.randint(0, 3, (N,), generator=gen).float()
    chosen = largest(scores, count, seed=count)
    assert chosen.dtype == torch.int64 and bool((chosen[1:] > chosen[:-1]).all())
    assert _is_a_topk(scores, chosen, count)
    mask = largest_mask(scores, count, seed=count)
    assert _is_a_topk(scores, torch.nonzero(mask).squeeze(1), count)


def test_short_vectors_and_edge_counts():
    scores = torch.tensor([0.5, -1.0, 3.0, 2.0])
    assert largest(scores, 2).tolist() == [2, 3]
    assert largest(scores, 0).numel() == 0 and largest(scores, 9).tolist() == [0, 1, 2, 3]
    assert largest_mask(scores, 3).tolist() == [True, False, True, True]


def test_a_skewed_vector_still_gives_the_topk():
    """Almost all mass on a few entries and a long flat tail of zeros: still exact."""
    scores = torch.zeros(N)
    scores[torch.arange(0, N, 997)] = torch.arange(1.0, 1.0 + len(range(0, N, 997)))
    count = 300
    assert _is_a_topk(scores, largest(scores, count), count)
