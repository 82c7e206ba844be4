"""fedtrust.compression: model updates 10-100x smaller on the wire (pure torch and numpy).

Two families:

- compress after training: `topk` (global top-k with error feedback) and `quantize`
  (unbiased stochastic rounding, tight bit packing);
- learned diffs, constrained during training: `sparse-diff` (gradual magnitude pruning of the
  diff) and `hashed-diff` (the diff lives in a random hashed subspace).

Device side::

    diff = make_diff(settings, base, total_steps, seed)   # None for topk / quantize
    ... before each optimizer step: diff.before_step(params)   (hashed-diff only)
    ... after each optimizer step: diff.after_step(params, step)
    update = diff.finish(params) if diff else {n: p - base[n] for n, p in params.items()}
    payload, residual = compress_with_feedback(update, residual, settings, seed)

Server side: ``update = decode(payload, shapes)`` (ValueError: drop the reply).
"""

from __future__ import annotations

from .codecs import (
    HASH_SEED,
    HASH_TOTAL,
    QUANT_BITS,
    Payload,
    Update,
    decode,
    encode,
    payload_bytes,
)
from .diffs import HashedDiff, SparseDiff, make_diff
from .feedback import compress_with_feedback
from .hashing import HashedSubspace, round_hash_seed
from .packing import dequantize, pack_bits, quantize, unpack_bits
from .settings import METHODS, CompressionSettings

__all__ = [
    "HASH_SEED",
    "HASH_TOTAL",
    "METHODS",
    "QUANT_BITS",
    "CompressionSettings",
    "HashedDiff",
    "HashedSubspace",
    "Payload",
    "SparseDiff",
    "Update",
    "compress_with_feedback",
    "decode",
    "dequantize",
    "encode",
    "make_diff",
    "pack_bits",
    "payload_bytes",
    "quantize",
    "round_hash_seed",
    "unpack_bits",
]
