"""Lossless model deltas for the downlink: the entries that changed, with their new values.

The server sends a device the new global model as the entries that differ from the version the
device holds (`changed_entries`); the device overwrites those entries (`apply_changes`). New
values replace old ones (no float addition), so the device's copy equals the server's bit for
bit; `state_crc` lets it check. When positions + values would not be smaller than the dense
tensor (about 80 % of the entries changed, with varint positions), the tensor is sent as it is.
"""

from __future__ import annotations

import zlib

import numpy as np

from .varint import decode_positions, encode_positions

State = dict[str, np.ndarray]


def changed_entries(new: State, old: State) -> State:
    """Per tensor either `name.pos` (varint flat positions) + `name.val` (their new values), or
    `name` (the whole new tensor, when that is smaller); unchanged tensors are left out."""
    out: State = {}
    for name, value in new.items():
        flat_new, flat_old = value.reshape(-1), old[name].reshape(-1)
        idx = np.flatnonzero(_bits(flat_new) != _bits(flat_old)).astype(np.int32)
        if idx.size == 0:
            continue
        # at least one byte a position: past that bound the dense tensor wins without encoding
        if idx.size * (1 + value.itemsize) >= value.nbytes:
            out[name] = np.ascontiguousarray(value)
            continue
        positions = encode_positions(idx)
        if positions.nbytes + idx.size * value.itemsize >= value.nbytes:
            out[name] = np.ascontiguousarray(value)
        else:
            out[f"{name}.pos"] = positions
            out[f"{name}.val"] = np.ascontiguousarray(flat_new[idx])
    return out


def apply_changes(old: State, changes: State) -> State:
    """`old` with `changes` (from `changed_entries`) written in; ValueError if they do not fit."""
    out = {k: v.copy() for k, v in old.items()}
    for key, value in changes.items():
        name, _, part = key.rpartition(".") if key.endswith((".pos", ".val")) else (key, "", "")
        if name not in out:
            raise ValueError(f"downlink entry {key!r} names no tensor of the model")
        if part == "val":
            continue
        target = out[name]
        if part == "":
            if value.shape != target.shape:
                raise ValueError(f"downlink tensor {name} has shape {value.shape}")
            out[name] = value.astype(target.dtype, copy=True)
            continue
        try:
            positions = decode_positions(value, target.size)
        except ValueError as error:
            raise ValueError(f"downlink entry {name}.pos: {error}") from None
        values = changes.get(f"{name}.val")
        if values is None or values.shape != positions.shape:
            raise ValueError(f"downlink entry {name}.pos has no matching values")
        target.reshape(-1)[positions] = values
    return out


def _bits(values: np.ndarray) -> np.ndarray:
    """The raw bit patterns (so -0.0 and +0.0, which compare equal, count as a change)."""
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


def state_crc(state: State) -> int:
    """A checksum of a model state's float32 bytes, in name order."""
    crc = 0
    for name in sorted(state):
        crc = zlib.crc32(np.ascontiguousarray(state[name], dtype=np.float32).tobytes(), crc)
    return crc
