"""Bit packing and unbiased stochastic quantisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtrust.compression import (
    CompressionSettings,
    decode,
    dequantize,
    encode,
    pack_bits,
    quantize,
    unpack_bits,
)


def _reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """Tight MSB-first packing, one character per bit: slow but obviously right."""
    stream = "".join(format(int(c), f"0{bits}b") for c in codes)
    stream += "0" * (-len(stream) % 8)
    return bytes(int(stream[i : i + 8], 2) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", range(1, 17))
def test_random_codes_round_trip_tightly_packed(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 9, 1001):
        codes = rng.integers(0, 2**bits, size=count)
        packed = pack_bits(codes, bits)
        assert packed.dtype == np.uint8
        assert len(packed) == math.ceil(count * bits / 8)
        assert packed.tobytes() == _reference_pack(codes, bits)
        np.testing.assert_array_equal(unpack_bits(packed, bits, count), codes)


def test_packing_crosses_chunk_boundaries():
    codes = np.random.default_rng(0).integers(0, 2**5, size=(1 << 20) + 13)
    np.testing.assert_array_equal(unpack_bits(pack_bits(codes, 5), 5, len(codes)), codes)


def test_a_wrong_byte_count_is_a_value_error():
    packed = pack_bits(np.arange(10), 4)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_bits(packed, 4, 12)


def _draw(values: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    packed, value_range = quantize(values, bits, torch.Generator().manual_seed(seed))
    assert packed.dtype == torch.uint8 and len(packed) == math.ceil(values.numel() * bits / 8)
    return dequantize(packed, value_range, bits, values.numel())


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_stochastic_rounding_is_unbiased(bits):
    """The mean over many seeds is within 5 standard errors of the value; the standard error
    comes from the rounding variance scale^2 * f * (1 - f) at fractional position f."""
    values = torch.randn(40, generator=torch.Generator().manual_seed(1))
    draws = 600
    mean = sum(_draw(values, bits, seed).double() for seed in range(draws)) / draws
    x = values.double()
    scale = (x.max() - x.min()) / (2**bits - 1)
    fraction = ((x - x.min()) / scale) % 1
    stderr = scale * (fraction * (1 - fraction) / draws).sqrt()
    assert ((mean - x).abs() <= 5 * stderr + 1e-6).all()


def test_the_rounding_is_random_not_nearest():
    """Deterministic rounding would be biased; two seeds must disagree somewhere."""
    values = torch.randn(200, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(_draw(values, 2, 0), _draw(values, 2, 1))


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
def test_every_draw_is_a_neighbouring_level(bits):
    values = torch.randn(500, generator=torch.Generator().manual_seed(3))
    decoded = _draw(values, bits, 0)
    scale = float(values.max() - values.min()) / (2**bits - 1)
    assert ((decoded - values).abs() <= scale * (1 + 1e-4) + 1e-6).all()
    assert decoded.min() == values.min() and decoded.max() == values.max()


def test_a_constant_tensor_decodes_exactly():
    values = torch.full((37,), -0.3125)
    for bits in (1, 5, 8):
        assert torch.equal(_draw(values, bits, 4), values)


def test_quantize_codec_is_unbiased_across_seeds():
    """The same property through encode/decode: the seed and the tensor name drive the draw."""
    update = {
        "w": torch.randn(6, 5, generator=torch.Generator().manual_seed(5)),
        "b": torch.ones(3),
    }
    shapes = {name: tuple(t.shape) for name, t in update.items()}
    settings = CompressionSettings(method="quantize", bits=2)
    draws = 400
    mean = sum(decode(encode(update, settings, seed=s), shapes)["w"].double() for s in range(draws))
    mean = mean / draws
    x = update["w"].double()
    scale = (x.max() - x.min()) / 3
    fraction = ((x - x.min()) / scale) % 1
    stderr = scale * (fraction * (1 - fraction) / draws).sqrt()
    assert ((mean - x).abs() <= 5 * stderr + 1e-6).all()
    assert torch.equal(decode(encode(update, settings, seed=0), shapes)["b"], update["b"])


@pytest.mark.parametrize(
    "values",
    [[0.0, 1e-39, 0.0, 5e-40], [-3e38, 3e38, 0.0, 1e38]],  # a denormal range, an overflowing one
)
def test_quantisation_survives_extreme_ranges(values):
    """float32 arithmetic would overflow here (levels / range or code x step): still within
    one level, and finite."""
    x = torch.tensor(values)
    packed, value_range = quantize(x, 8, torch.Generator().manual_seed(0))
    back = dequantize(packed, value_range, 8, len(values))
    level = (max(values) - min(values)) / 255
    assert torch.isfinite(back).all()
    assert ((back.double() - x.double()).abs() <= level * (1 + 1e-6)).all()
