"""Varint position gaps: exact round trips, about a byte an entry when sparse, bad bytes refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrust.compression.varint import decode_positions, encode_positions


@pytest.mark.parametrize(
    "numel, count", [(1, 1), (10, 0), (10, 10), (1000, 7), (2_000_000, 20_000)]
)
def test_positions_round_trip_exactly(numel, count):
    rng = np.random.default_rng(numel + count)
    positions = np.sort(rng.choice(numel, count, replace=False))
    assert np.array_equal(decode_positions(encode_positions(positions), numel), positions)


def test_large_gaps_and_positions_take_more_bytes_and_still_round_trip():
    positions = np.array([0, 127, 128, 2**14, 2**21 + 5, 2**28 + 1, 2**33], dtype=np.int64)
    data = encode_positions(positions)
    assert np.array_equal(decode_positions(data, 2**34), positions)
    assert data.size > positions.size


def test_one_percent_of_a_large_tensor_costs_well_under_two_bytes_an_entry():
    rng = np.random.default_rng(0)
    numel = 2_000_000
    positions = np.sort(rng.choice(numel, numel // 100, replace=False))
    assert encode_positions(positions).size < 1.5 * positions.size  # int32 would be 4


@pytest.mark.parametrize(
    "data, numel, message",
    [
        (np.array([0x85], np.uint8), 10, "middle of a value"),
        (np.array([3, 0], np.uint8), 10, "not strictly increasing"),
        (np.array([9, 1], np.uint8), 10, "outside"),
        (np.array([0x80] * 5 + [1], np.uint8), 2**40, "longer than five bytes"),
    ],
)
def test_malformed_positions_are_one_line_errors(data, numel, message):
    with pytest.raises(ValueError, match=message):
        decode_positions(data, numel)
