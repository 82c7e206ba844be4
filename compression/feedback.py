"""Error feedback: what compression dropped this round is added to the next round's update.

Biased compressors (top-k) never send a coordinate that stays small, and their error adds up
round after round; keeping the residual on the device and resending it makes the sum of what
was sent track the sum of the updates (nothing is lost, only delayed).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .codecs import Payload, Update, decode, encode
from .settings import CompressionSettings


def compress_with_feedback(
    update: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
    settings: CompressionSettings,
    seed: int,
    rounding_seed: int | None = None,
) -> tuple[Payload, Update]:
    """Encode update + residual; return the payload and the new residual (what it missed).

    `seed` and `rounding_seed` as in `encode`. For methods without feedback (or
    error_feedback false) the residual is ignored and the returned one is empty. The residual
    stays on the update's device; keep it between rounds.
    """
    if not settings.check().feedback:
        return encode(update, settings, seed=seed, rounding_seed=rounding_seed), {}
    residual = residual or {}
    for name, tensor in residual.items():
        if name not in update or tuple(tensor.shape) != tuple(update[name].shape):
            raise ValueError(f"residual tensor {name!r} does not match the update's tensors")
    corrected = {
        name: tensor.detach() + residual[name].to(tensor.device) if name in residual else tensor
        for name, tensor in update.items()
    }
    payload = encode(corrected, settings, seed=seed, rounding_seed=rounding_seed)
    sent = decode(payload, {name: tuple(t.shape) for name, t in corrected.items()})
    new_residual = {
        name: (tensor.detach().float() - sent[name].to(tensor.device))
        for name, tensor in corrected.items()
    }
    return payload, new_residual
