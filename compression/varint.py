"""Sorted positions as LEB128 varint gaps: about one byte per sent entry instead of four.

A sparse update's positions are sorted, so it sends the gaps between them (the first position,
then each step to the next, >= 1), each in 7-bit groups, low group first, the high bit set on
every byte but a value's last. At 1 % density the mean gap is 100: one byte for most entries.
"""

from __future__ import annotations

import numpy as np

_LIMIT = 2**35  # five bytes: positions of tensors up to 34 billion entries


def encode_positions(positions: np.ndarray) -> np.ndarray:
    """uint8 varint gaps of strictly increasing non-negative positions."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    gaps = np.diff(positions, prepend=0) if positions.size else positions
    if positions.size:
        gaps[0] = positions[0]
    lengths = 1 + sum((gaps >= 2 ** (7 * k)).astype(np.int64) for k in range(1, 5))
    owner = np.repeat(np.arange(gaps.size), lengths)
    starts = np.cumsum(lengths) - lengths
    group = np.arange(owner.size) - starts[owner]
    out = (gaps[owner] >> (7 * group)) & 0x7F
    out |= np.where(group < lengths[owner] - 1, 0x80, 0)
    return out.astype(np.uint8)


def decode_positions(data: np.ndarray, numel: int) -> np.ndarray:
    """The positions `encode_positions` wrote; ValueError unless they are strictly increasing
    and inside 0..numel-1, and every value is complete."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = (data & 0x80) == 0
    if not last[-1]:
        raise ValueError("varint positions end in the middle of a value")
    owner = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    group = np.arange(data.size) - starts[owner]
    if group.max() > 4:
        raise ValueError("a varint position is longer than five bytes")
    gaps = np.zeros(starts.size, dtype=np.int64)
    np.add.at(gaps, owner, (data & 0x7F).astype(np.int64) << (7 * group))
    if gaps.size > 1 and gaps[1:].min() < 1:
        raise ValueError("varint positions are not strictly increasing")
    positions = np.cumsum(gaps)
    if positions[-1] >= min(numel, _LIMIT):
        raise ValueError(f"a varint position is outside 0..{numel - 1}")
    return positions
