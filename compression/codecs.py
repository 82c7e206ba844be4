"""Encode a model update into a small payload of flat, named tensors and decode it back.

An update is {name: float32 tensor} (new weights - base weights); a payload is what goes on
the wire. Payload keys, per tensor `name` of the update:

- none: `name` -> the dense float32 tensor.
- topk / sparse-diff: `name.pos` uint8, the flat positions (strictly increasing) as varint
  gaps (`fedtrust.compression.varint`: about 1.3 bytes an entry at 1 % density; `name.idx`
  int32 positions are accepted too), and `name.val` float32 values; a tensor with no sent
  entry is left out.
- quantize: `name.q` uint8 packed codes and `name.range` float32 [lo, hi], for every tensor.
- hashed-diff: `name.buckets` float32 bucket values, plus `hash.seed` and `hash.total` (int64
  scalars: hash seed and bucket total).

With bits > 0 the sparse and hashed values are quantised too: `name.q` + `name.range` replace
`name.val` / `name.buckets`. Every quantised payload carries `quant.bits` (int32 scalar).
Decoding needs only the payload and the update's tensor shapes; a malformed payload (from a
buggy or hostile device) raises ValueError with a one-line message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedtrust.errors import ConfigError

from .hashing import hashed_subspace
from .packing import dequantize, generator, quantize
from .selection import largest
from .settings import MAX_BITS, SPARSE_METHODS, CompressionSettings
from .varint import decode_positions, encode_positions

Update = dict[str, torch.Tensor]
Payload = dict[str, torch.Tensor]
Shapes = Mapping[str, Sequence[int]]

HASH_SEED = "hash.seed"
HASH_TOTAL = "hash.total"
QUANT_BITS = "quant.bits"
_FLOATS = (torch.float32, torch.float16)
_INDEX_TYPES = (torch.int32, torch.int64)


def encode(
    update: Mapping[str, torch.Tensor],
    settings: CompressionSettings,
    *,
    seed: int,
    rounding_seed: int | None = None,
) -> Payload:
    """The payload for `update` under `settings`. `seed` drives the hash (use the same seed for
    a hashed-diff update as for its training) and, unless `rounding_seed` is given, the
    stochastic rounding: give each device its own `rounding_seed` when devices share the hash
    seed, or their rounding errors line up instead of averaging out."""
    settings.check()
    rounding = seed if rounding_seed is None else rounding_seed
    dense = {name: _dense_cpu(name, tensor) for name, tensor in update.items()}
    bits = settings.effective_bits
    entries = sum(t.numel() for t in dense.values())
    if settings.method == "none":
        return {name: tensor.clone() for name, tensor in dense.items()}
    payload: Payload = {}
    if settings.method in SPARSE_METHODS:
        payload = _encode_sparse(dense, settings.keep_count(entries), bits, rounding)
    elif settings.method == "quantize":
        for name, tensor in dense.items():
            _put_values(payload, name, tensor.reshape(-1), bits, rounding, "val")
    else:
        shapes = {name: tuple(t.shape) for name, t in dense.items()}
        subspace = hashed_subspace(shapes, settings.bucket_count(entries), seed)
        for name, values in subspace.project(dense).items():
            _put_values(payload, name, values, bits, rounding, "buckets")
        payload[HASH_SEED] = torch.tensor(subspace.seed, dtype=torch.int64)
        payload[HASH_TOTAL] = torch.tensor(subspace.buckets, dtype=torch.int64)
    if bits and payload:
        payload[QUANT_BITS] = torch.tensor(bits, dtype=torch.int32)
    return payload


def decode(payload: Mapping[str, torch.Tensor], shapes: Shapes) -> Update:
    """The float32 update a payload stands for, one tensor per name in `shapes`."""
    shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    for key, value in payload.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"payload key {key!r} holds a {type(value).__name__}, not a tensor")
    if HASH_SEED in payload:
        return _decode_hashed(payload, shapes)
    if payload and all(key in shapes for key in payload):
        return _decode_dense(payload, shapes)
    return _decode_keyed(payload, shapes)


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire: the sum of the payload tensors' sizes."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def _dense_cpu(name: str, tensor: torch.Tensor) -> torch.Tensor:
    dense = tensor.detach().to("cpu", torch.float32)
    if not torch.isfinite(dense).all():
        raise ValueError(f"update tensor {name!r} has non-finite values")
    return dense


def _encode_sparse(dense: Update, keep: int, bits: int, seed: int) -> Payload:
    """Global top-k by magnitude over all tensors, or the nonzeros if there are no more than k
    (a sparse-diff update already has at most k)."""
    names = list(dense)
    flats = [dense[name].reshape(-1) for name in names]
    joined = torch.cat(flats) if flats else torch.zeros(0)
    if int(torch.count_nonzero(joined)) > keep:
        chosen = largest(joined.abs(), keep)
    else:
        chosen = torch.nonzero(joined).squeeze(1)
    ends = torch.tensor([flat.numel() for flat in flats], dtype=torch.int64).cumsum(0)
    bounds = torch.searchsorted(chosen, ends).tolist()
    payload: Payload = {}
    start, offset = 0, 0
    for name, flat, stop in zip(names, flats, bounds):
        part = chosen[start:stop]
        if part.numel():
            payload[f"{name}.pos"] = torch.from_numpy(encode_positions((part - offset).numpy()))
            _put_values(payload, name, joined[part], bits, seed, "val")
        start, offset = stop, offset + flat.numel()
    return payload


def _put_values(
    payload: Payload, name: str, values: torch.Tensor, bits: int, seed: int, field: str
) -> None:
    if bits:
        payload[f"{name}.q"], payload[f"{name}.range"] = quantize(
            values, bits, generator(seed, name, "quant")
        )
    else:
        payload[f"{name}.{field}"] = values.to(torch.float32).contiguous()


def _decode_dense(payload: Mapping[str, torch.Tensor], shapes: dict[str, tuple]) -> Update:
    missing = [name for name in shapes if name not in payload]
    if missing:
        raise ValueError(f"dense payload lacks tensor {missing[0]!r}")
    out = {}
    for name, shape in shapes.items():
        tensor = payload[name]
        if tensor.dtype not in _FLOATS or tuple(tensor.shape) != shape:
            raise ValueError(
                f"payload tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"not float32 {shape}"
            )
        out[name] = _finite(name, tensor.to(torch.float32).clone())
    return out


def _decode_keyed(payload: Mapping[str, torch.Tensor], shapes: dict[str, tuple]) -> Update:
    """A topk / sparse-diff payload (has `.idx` keys, or is empty) or a quantize payload."""
    if HASH_TOTAL in payload:
        raise ValueError(f"payload key {HASH_TOTAL!r} comes without {HASH_SEED!r}")
    fields = _fields(payload, shapes, ("idx", "pos", "val", "q", "range"))
    bits = _bits(payload)
    sparse = not fields or any("idx" in parts or "pos" in parts for parts in fields.values())
    out = {}
    for name, shape in shapes.items():
        parts, numel = fields.get(name, {}), math.prod(shape)
        if not sparse:
            if not parts:
                raise ValueError(f"quantize payload lacks tensor {name!r}")
            values = _values(name, parts, numel, bits, ("q", "range"))
            out[name] = values.reshape(shape)
            continue
        flat = torch.zeros(numel, dtype=torch.float32)
        if parts:
            index = _positions(name, parts, numel)
            flat[index] = _values(name, parts, index.numel(), bits, ("val", "q", "range"))
        out[name] = flat.reshape(shape)
    return out


def _decode_hashed(payload: Mapping[str, torch.Tensor], shapes: dict[str, tuple]) -> Update:
    seed, total = _scalar(payload, HASH_SEED), _scalar(payload, HASH_TOTAL)
    tensors = sum(1 for shape in shapes.values() if math.prod(shape) > 0)
    entries = sum(math.prod(shape) for shape in shapes.values())
    if not tensors <= total <= entries:
        raise ValueError(f"payload {HASH_TOTAL} {total} is outside {tensors}..{entries}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"payload {HASH_SEED} {seed} is outside 0..2**32-1")
    fields = _fields(payload, shapes, ("buckets", "q", "range"))
    bits = _bits(payload)
    try:
        subspace = hashed_subspace(shapes, total, seed)
    except ConfigError as error:
        raise ValueError(f"payload {HASH_TOTAL}: {error}") from None
    values = {}
    for name, size in subspace.sizes.items():
        if size and name not in fields:
            raise ValueError(f"hashed payload lacks tensor {name!r}")
        values[name] = _values(name, fields.get(name, {}), size, bits, ("buckets", "q", "range"))
    return subspace.expand(values)


def _fields(
    payload: Mapping[str, torch.Tensor], shapes: dict[str, tuple], allowed: tuple[str, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    """Per tensor name, its payload fields; ValueError on a key that is none of them."""
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in payload.items():
        if key in (HASH_SEED, HASH_TOTAL, QUANT_BITS):
            continue
        name, _, field = key.rpartition(".")
        if name not in shapes or field not in allowed:
            raise ValueError(f"payload key {key!r} is not a known field of this update")
        fields.setdefault(name, {})[field] = value
    return fields


def _values(
    name: str, parts: Mapping[str, torch.Tensor], count: int, bits: int, allowed: tuple[str, ...]
) -> torch.Tensor:
    """The `count` float32 values of one tensor: plain (`val` / `buckets`) or quantised."""
    plain = [field for field in parts if field not in ("idx", "pos", "q", "range")]
    if plain and ("q" in parts or "range" in parts):
        raise ValueError(f"payload for {name!r} has both .{plain[0]} and .q values")
    if plain and plain[0] not in allowed:
        raise ValueError(f"payload {name}.{plain[0]} does not belong in this kind of payload")
    if plain:
        values = parts[plain[0]]
        if values.dtype not in _FLOATS or values.dim() != 1 or values.numel() != count:
            raise ValueError(
                f"payload {name}.{plain[0]} is {values.dtype} {tuple(values.shape)}, "
                f"not {count} float32 values"
            )
        return _finite(name, values.to(torch.float32))
    if "q" not in parts or "range" not in parts:
        if count == 0:
            return torch.zeros(0)
        raise ValueError(f"payload for {name!r} lacks its values ({'/'.join(allowed)})")
    packed, value_range = parts["q"], parts["range"]
    if not bits:
        raise ValueError(f"payload has {name}.q but no {QUANT_BITS}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"payload {name}.q is {packed.dtype} {tuple(packed.shape)}, not uint8")
    if value_range.dtype not in _FLOATS or tuple(value_range.shape) != (2,):
        raise ValueError(f"payload {name}.range is not two float32 values [lo, hi]")
    lo, hi = _finite(name, value_range.to(torch.float32)).tolist()
    if lo > hi:
        raise ValueError(f"payload {name}.range has lo {lo} > hi {hi}")
    try:
        return dequantize(packed, value_range, bits, count)
    except ValueError as error:
        raise ValueError(f"payload {name}.q: {error}") from None


def _positions(name: str, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
    """A sparse tensor's positions: varint gaps (`.pos`, what fedtrust sends) or int32
    (`.idx`)."""
    if ("pos" in parts) == ("idx" in parts):
        raise ValueError(f"sparse payload for {name!r} needs exactly one of {name}.pos, {name}.idx")
    if "idx" in parts:
        return _indices(name, parts["idx"], numel)
    data = parts["pos"]
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"payload {name}.pos is {data.dtype} {tuple(data.shape)}, not uint8")
    try:
        return torch.from_numpy(decode_positions(data.numpy(), numel))
    except ValueError as error:
        raise ValueError(f"payload {name}.pos: {error}") from None


def _indices(name: str, index: torch.Tensor, numel: int) -> torch.Tensor:
    if index.dtype not in _INDEX_TYPES or index.dim() != 1:
        raise ValueError(f"payload {name}.idx is {index.dtype} {tuple(index.shape)}, not int32")
    index = index.to(torch.int64)
    if index.numel() and (index[0] < 0 or index[-1] >= numel):
        raise ValueError(f"payload {name}.idx has an index outside 0..{numel - 1}")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"payload {name}.idx is not strictly increasing")
    return index


def _bits(payload: Mapping[str, torch.Tensor]) -> int:
    if QUANT_BITS not in payload:
        return 0
    bits = _scalar(payload, QUANT_BITS)
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"payload {QUANT_BITS} {bits} is outside 1..{MAX_BITS}")
    return bits


def _scalar(payload: Mapping[str, torch.Tensor], key: str) -> int:
    if key not in payload:
        raise ValueError(f"payload lacks {key!r}")
    value = payload[key]
    integer = not (value.dtype.is_floating_point or value.dtype.is_complex)
    if value.dtype == torch.bool or not integer or value.numel() != 1:
        raise ValueError(f"payload {key} is {value.dtype} {tuple(value.shape)}, not an integer")
    return int(value.reshape(-1)[0])


def _finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"payload values for {name!r} are not all finite")
    return tensor
