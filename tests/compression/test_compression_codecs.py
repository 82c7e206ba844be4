"""encode/decode round trips per method, payload sizes, and what a malformed payload does."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrust.compression import (
    CompressionSettings,
    HashedSubspace,
    decode,
    encode,
    payload_bytes,
)


def _update(seed: int = 0, sizes=((40, 30), (30,), (8, 4, 5))) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(*shape, generator=gen) for i, shape in enumerate(sizes)}


def _shapes(update):
    return {name: tuple(t.shape) for name, t in update.items()}


def _reference_topk(update, k):
    """Zero all but the k entries of largest magnitude over the whole update (sort-based)."""
    joined = torch.cat([t.reshape(-1) for t in update.values()])
    threshold = joined.abs().sort(descending=True).values[k - 1]
    return {name: torch.where(t.abs() >= threshold, t, 0.0) for name, t in update.items()}


def test_none_round_trips_exactly_and_sends_the_dense_update():
    update = _update()
    payload = encode(update, CompressionSettings(), seed=0)
    assert set(payload) == set(update)
    decoded = decode(payload, _shapes(update))
    assert all(torch.equal(decoded[name], update[name]) for name in update)
    assert payload_bytes(payload) == 4 * sum(t.numel() for t in update.values())


@pytest.mark.parametrize("density", [0.003, 0.05, 0.5])
def test_topk_decodes_to_the_global_topk_sparsification(density):
    update = _update(1)
    total = sum(t.numel() for t in update.values())
    settings = CompressionSettings(method="topk", density=density)
    payload = encode(update, settings, seed=0)
    decoded = decode(payload, _shapes(update))
    expected = _reference_topk(update, max(1, round(density * total)))
    assert all(torch.equal(decoded[name], expected[name]) for name in update)
    assert sum(int((t != 0).sum()) for t in decoded.values()) == max(1, round(density * total))
    for name in update:
        if f"{name}.pos" in payload:  # positions as varint gaps, float32 values
            assert payload[f"{name}.pos"].dtype == torch.uint8
            assert payload[f"{name}.val"].dtype == torch.float32


def test_topk_is_global_so_a_tensor_of_small_entries_is_left_out():
    update = {"big": 100 * torch.randn(50), "small": 0.01 * torch.randn(50)}
    payload = encode(update, CompressionSettings(method="topk", density=0.2), seed=0)
    assert set(payload) == {"big.pos", "big.val"}
    decoded = decode(payload, _shapes(update))
    assert torch.equal(decoded["small"], torch.zeros(50))
    assert int((decoded["big"] != 0).sum()) == 20


def test_sparse_diff_sends_exactly_the_nonzeros_of_a_sparse_update():
    update = {name: torch.zeros_like(t) for name, t in _update().items()}
    total = sum(t.numel() for t in update.values())
    picks = torch.randperm(1200, generator=torch.Generator().manual_seed(0))[:9]
    update["layer0.weight"].view(-1)[picks] = torch.tensor([1e-6, -3.0, 2.0, 5.0, 1e-9] * 2)[:9]
    update["layer2.weight"][0, 0, 0] = -1e-8
    settings = CompressionSettings(method="sparse-diff", density=10 / total)
    payload = encode(update, settings, seed=0)
    decoded = decode(payload, _shapes(update))
    assert all(torch.equal(decoded[name], update[name]) for name in update)
    assert len(payload["layer0.weight.val"]) == 9 and "layer1.weight.pos" not in payload


def test_sparse_diff_with_too_many_nonzeros_falls_back_to_topk():
    update = _update(2)
    settings = CompressionSettings(method="sparse-diff", density=0.01)
    decoded = decode(encode(update, settings, seed=0), _shapes(update))
    k = round(0.01 * sum(t.numel() for t in update.values()))
    expected = _reference_topk(update, k)
    assert all(torch.equal(decoded[name], expected[name]) for name in update)


def test_topk_with_quantised_values_keeps_the_support_and_the_error_small():
    update = _update(3)
    settings = CompressionSettings(method="topk", density=0.05, bits=8)
    payload = encode(update, settings, seed=0)
    assert not any(key.endswith(".val") for key in payload)
    decoded = decode(payload, _shapes(update))
    expected = _reference_topk(update, round(0.05 * sum(t.numel() for t in update.values())))
    for name in update:
        sent = expected[name] != 0
        assert torch.equal(decoded[name] != 0, sent)
        if f"{name}.range" in payload:
            lo, hi = payload[f"{name}.range"].tolist()
            error = (decoded[name] - expected[name]).abs().max()
            assert error <= (hi - lo) / 255 * (1 + 1e-4)


@pytest.mark.parametrize("bits", [0, 6])
def test_hashed_diff_decodes_to_the_projection(bits):
    update = _update(4)
    shapes = _shapes(update)
    settings = CompressionSettings(method="hashed-diff", buckets=150, bits=bits)
    payload = encode(update, settings, seed=11)
    decoded = decode(payload, shapes)
    subspace = HashedSubspace(shapes, 150, seed=11)
    projected = subspace.expand(subspace.project(update))
    for name in update:
        if bits == 0:
            assert torch.allclose(decoded[name], projected[name], atol=1e-6)
        else:
            lo, hi = payload[f"{name}.range"].tolist()
            assert (decoded[name] - projected[name]).abs().max() <= (hi - lo) / 63 + 1e-6
    if bits == 0:
        assert sum(len(payload[f"{name}.buckets"]) for name in update) == 150


def test_hashed_diff_derives_buckets_from_density():
    update = _update(5)
    total = sum(t.numel() for t in update.values())
    payload = encode(update, CompressionSettings(method="hashed-diff", density=0.1), seed=0)
    assert sum(len(payload[f"{name}.buckets"]) for name in update) == round(0.1 * total)
    assert int(payload["hash.total"]) == round(0.1 * total)


def test_quantize_round_trip_is_within_one_level():
    update = _update(6)
    payload = encode(update, CompressionSettings(method="quantize", bits=4), seed=3)
    decoded = decode(payload, _shapes(update))
    for name, tensor in update.items():
        assert payload[f"{name}.q"].dtype == torch.uint8
        assert len(payload[f"{name}.q"]) == math.ceil(tensor.numel() * 4 / 8)
        scale = float(tensor.max() - tensor.min()) / 15
        assert (decoded[name] - tensor).abs().max() <= scale * (1 + 1e-4)


def test_encoding_is_deterministic_in_the_seed():
    update = _update(7)
    settings = CompressionSettings(method="quantize", bits=3)
    first, again = encode(update, settings, seed=5), encode(update, settings, seed=5)
    other = encode(update, settings, seed=6)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_devices_sharing_a_hash_average_out_their_rounding_with_their_own_rounding_seeds():
    """Ten devices of a round hash alike (one seed) but round on their own seeds: the mean of
    their 2-bit payloads is much closer to the mean update than when they round alike."""
    update = _update(12)
    shapes = _shapes(update)
    settings = CompressionSettings(method="hashed-diff", buckets=300, bits=2)
    exact = decode(
        encode(update, CompressionSettings(method="hashed-diff", buckets=300), seed=1), shapes
    )

    def error(rounding_seeds):
        decoded = [
            decode(encode(update, settings, seed=1, rounding_seed=r), shapes)
            for r in rounding_seeds
        ]
        return sum(
            float((sum(d[n] for d in decoded) / len(decoded) - exact[n]).square().sum())
            for n in update
        )

    own, shared = error(range(10)), error([7] * 10)
    assert own < 0.3 * shared
    same = encode(update, settings, seed=1, rounding_seed=3)
    assert torch.equal(same["hash.seed"], encode(update, settings, seed=1)["hash.seed"])


def test_compression_ratios():
    update = _update(8, sizes=((200, 100), (100, 50), (100,)))
    dense = payload_bytes(encode(update, CompressionSettings(), seed=0))
    topk = payload_bytes(encode(update, CompressionSettings(method="topk", density=0.01), seed=0))
    topk8 = CompressionSettings(method="topk", density=0.01, bits=8)
    q4 = CompressionSettings(method="quantize", bits=4)
    assert dense == 4 * sum(t.numel() for t in update.values())
    assert dense / topk >= 45
    assert payload_bytes(encode(update, topk8, seed=0)) < topk
    assert dense / payload_bytes(encode(update, q4, seed=0)) >= 7.5


def test_an_all_zero_topk_update_is_an_empty_payload_that_decodes_to_zeros():
    update = {name: torch.zeros_like(t) for name, t in _update().items()}
    payload = encode(update, CompressionSettings(method="topk"), seed=0)
    assert payload == {}
    decoded = decode(payload, _shapes(update))
    assert all(torch.equal(decoded[name], update[name]) for name in update)


def test_a_non_finite_update_is_refused():
    update = _update()
    update["layer1.weight"][3] = math.inf
    with pytest.raises(ValueError, match="layer1.weight"):
        encode(update, CompressionSettings(method="topk"), seed=0)


def test_two_million_entries_topk_and_hashing_at_scale():
    gen = torch.Generator().manual_seed(9)
    update = {
        "emb": torch.randn(1500, 1000, generator=gen),
        "head": torch.randn(500_000, generator=gen),
    }
    shapes = _shapes(update)
    total = 2_000_000
    decoded = decode(encode(update, CompressionSettings(method="topk"), seed=0), shapes)
    joined = torch.cat([t.reshape(-1) for t in update.values()])
    kept = torch.cat([t.reshape(-1) for t in decoded.values()])
    assert int((kept != 0).sum()) == round(0.01 * total)
    threshold = joined.abs().kthvalue(total - round(0.01 * total) + 1).values
    assert torch.equal(kept, torch.where(joined.abs() >= threshold, joined, 0.0))

    hashed = CompressionSettings(method="hashed-diff", density=0.01)
    payload = encode(update, hashed, seed=1)
    assert payload_bytes(payload) < 0.011 * 4 * total
    decoded = decode(payload, shapes)
    again = decode(encode(decoded, hashed, seed=1), shapes)
    assert all(torch.allclose(again[n], decoded[n], atol=1e-5) for n in shapes)
