"""The k largest scores of a long vector, fast: as sorted positions or as a mask.

`torch.topk` of 1 % of a 7-million-entry update takes ~0.35 s on two CPU cores. A random
sample's quantiles give two thresholds that bracket the k-th largest score with near certainty:
everything above the upper one is in, and an exact top-k among the few scores between them
settles the rest. The result is exactly a top-k (ties broken arbitrarily); when the bracket
misses (a six-sigma event) or the vector is short, the full top-k runs instead.
"""

from __future__ import annotations

import math

import torch

SAMPLE = 1 << 16  # sample size: six standard errors of its quantile at 1 % are ~0.23 %


def largest(scores: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Ascending int64 positions of the `count` largest entries of the 1-D `scores`."""
    mask = largest_mask(scores, count, seed)
    return torch.nonzero(mask).squeeze(1)


def largest_mask(scores: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """A bool mask of the `count` largest entries of the 1-D `scores`."""
    n = scores.numel()
    count = max(0, min(count, n))
    bracket = _bracket(scores, count, seed) if n > 8 * SAMPLE and 0 < count < n else None
    if bracket is not None:
        mask, settled = bracket
        mask[settled] = True
        return mask
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores, count, sorted=False).indices] = True
    return mask


def _bracket(
    scores: torch.Tensor, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mask of the scores surely in, positions of the rest of the top-k), or None."""
    n = scores.numel()
    share = count / n
    margin = 6 * math.sqrt(max(share * (1 - share), 1 / SAMPLE) / SAMPLE)
    gen = torch.Generator(device=scores.device).manual_seed(seed)
    sample = scores[torch.randint(0, n, (SAMPLE,), generator=gen, device=scores.device)]
    quantiles = torch.tensor(
        [max(0.0, 1 - share - margin), min(1.0, 1 - share + margin)], device=scores.device
    )
    low, high = torch.quantile(sample.float(), quantiles).to(scores.dtype)
    if share < margin:  # a handful of entries: the sample's top would already hold too many
        high = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    above = scores > high
    need = count - int(above.sum())
    band = torch.nonzero((scores >= low) & ~above).squeeze(1)
    if not 0 <= need <= band.numel():
        return None
    return above, band[torch.topk(scores[band], need, sorted=False).indices]
