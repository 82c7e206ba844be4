"""Stochastic quantisation and tight bit packing of value vectors, plus seeded random streams.

Codes are packed most significant bit first, so 8 bits is one byte per value and 16 bits is
big-endian uint16; any other width shares bytes between neighbouring values.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

# Values per packing chunk: a multiple of 8, so every chunk ends on a byte boundary.
_CHUNK = 1 << 20


def stream_seed(seed: int, name: str, salt: str = "") -> int:
    """A generator seed from a run seed and a tensor name: crc32 of the name started from the
    seed (stable across runs, unlike Python's salted `hash`; a bijection of seed mod 2**32).
    32 bits because torch's CPU generator ignores a seed's upper 32 bits."""
    return zlib.crc32(f"{salt}{name}".encode(), int(seed) % 2**32)


def generator(seed: int, name: str, salt: str = "") -> torch.Generator:
    """A CPU generator for one tensor's random draws."""
    return torch.Generator().manual_seed(stream_seed(seed, name, salt))


def packed_length(count: int, bits: int) -> int:
    """Bytes holding `count` codes of `bits` bits each."""
    return math.ceil(count * bits / 8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer codes (< 2**bits) into ceil(len * bits / 8) uint8 bytes."""
    codes = np.asarray(codes).reshape(-1)
    if bits == 8:
        return codes.astype(np.uint8)
    if bits == 16:
        return codes.astype(">u2").view(np.uint8)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    chunks = [
        np.packbits(((codes[i : i + _CHUNK, None].astype(np.int64) >> shifts) & 1).astype(np.uint8))
        for i in range(0, len(codes), _CHUNK)
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` int64 codes that `pack_bits` packed; ValueError if the length is wrong."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if len(packed) != packed_length(count, bits):
        raise ValueError(
            f"{len(packed)} packed bytes do not hold {count} values of {bits} bits "
            f"({packed_length(count, bits)} expected)"
        )
    if bits == 8:
        return packed.astype(np.int64)
    if bits == 16:
        return packed.view(">u2").astype(np.int64)
    weights = np.left_shift(1, np.arange(bits - 1, -1, -1, dtype=np.int64))
    step = _CHUNK * bits // 8
    parts = []
    for start, first in zip(range(0, len(packed), step), range(0, count, _CHUNK)):
        values = min(_CHUNK, count - first)
        plane = np.unpackbits(packed[start : start + step], count=values * bits)
        parts.append(plane.reshape(values, bits).astype(np.int64) @ weights)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def quantize(
    values: torch.Tensor, bits: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastically round `values` to 2**bits levels between their min and max.

    Rounding up with probability equal to the fractional position keeps the decoded value
    unbiased (E[decoded] = value). Returns (packed uint8 codes, float32 [lo, hi]).
    """
    x = values.detach().reshape(-1).to("cpu", torch.float32)
    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(2, dtype=torch.float32)
    lo, hi = x.aminmax()
    levels = 2**bits - 1
    # float32 resolves a level's fraction to ~2**-16 up to 8 bits; wider codes, and ranges so
    # narrow or wide that levels / (hi - lo) leaves float32, need float64
    scale = levels / (hi - lo)  # float32: inf for a denormal range, 0 when hi - lo overflows
    if bits > 8 or (hi > lo and not (torch.isfinite(scale) and scale > 0)):
        x, lo, hi = x.double(), lo.double(), hi.double()
        scale = levels / (hi - lo)
    if hi == lo:
        codes = torch.zeros(x.numel(), dtype=torch.int64)
    else:
        position = (x - lo).mul_(scale)
        floor = position.floor()
        up = torch.rand(x.numel(), generator=gen, dtype=x.dtype) < position.sub_(floor)
        codes = floor.add_(up).clamp_(0, levels).to(torch.uint8 if bits <= 8 else torch.int64)
    packed = torch.from_numpy(pack_bits(codes.numpy(), bits))
    return packed, torch.stack([lo, hi]).to(torch.float32)


def dequantize(
    packed: torch.Tensor, value_range: torch.Tensor, bits: int, count: int
) -> torch.Tensor:
    """The float32 values `quantize` encoded (ValueError on a wrong byte count)."""
    if bits == 8:  # the bytes are the codes
        if packed.numel() != count:
            unpack_bits(packed.numpy(), bits, count)  # raises the length error
        codes = packed
    else:
        codes = torch.from_numpy(unpack_bits(packed.numpy(), bits, count))
    lo, hi = value_range.to(torch.float64)
    if hi == lo:
        return torch.full((count,), float(lo), dtype=torch.float32)
    # float32 unless a code times the step could overflow it on the way to hi
    dtype = torch.float32 if bits <= 8 and float(hi - lo) < 1e37 else torch.float64
    step = float((hi - lo) / (2**bits - 1))
    return codes.to(dtype).mul_(step).add_(float(lo)).to(torch.float32)
