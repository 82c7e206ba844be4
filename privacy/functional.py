"""Whole-model per-sample gradients with torch.func (functional_call + vmap + grad).

Materialises one gradient per sample and parameter, so it is memory-hungry and slower than the
hook path; it is the independent reference the tests compare against, and a tool for models
whose layers the hook path does not know.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .data import batch_size_of


def _is_causal(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def vmap_ready_batch(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Replace a 2-D padding ``attention_mask`` by a ready 4-D boolean mask.

    transformers builds masks with data-dependent checks (``.item()``) that vmap cannot trace;
    a 4-D mask is used as given. For causal models the causal triangle is included.
    """
    out = dict(batch)
    mask = out.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return out
    keep = mask.bool()
    t = keep.shape[1]
    if _is_causal(model):
        causal = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
        out["attention_mask"] = causal[None, None] & keep[:, None, None, :]
    else:
        out["attention_mask"] = keep[:, None, None, :]
    return out


def per_sample_gradients(
    model: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (B, *shape)}`` of the trainable parameters.

    Sample i's loss is ``loss_fn(model(**batch_i))`` on a batch of one (default: ``.loss``), so
    with a mean-reduced loss this equals the hook path's per-sample gradient. Frozen parameters
    are skipped; tied parameters get one gradient (the sum of their uses).
    """
    b = batch_size_of(batch)
    ready = vmap_ready_batch(model, batch)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed: dict[str, Tensor] = {
        n: p.detach() for n, p in model.named_parameters() if not p.requires_grad
    }
    fixed.update(dict(model.named_buffers()))
    batched = {
        k: v for k, v in ready.items() if isinstance(v, Tensor) and v.dim() and v.shape[0] == b
    }
    shared = {k: v for k, v in ready.items() if k not in batched}

    def loss_of(p: dict[str, Tensor], sample: dict[str, Tensor]) -> Tensor:
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        out = functional_call(model, {**fixed, **p}, (), {**shared, **one})
        return loss_fn(out) if loss_fn is not None else out.loss

    fn = vmap(grad(loss_of), in_dims=(None, 0), chunk_size=chunk_size, randomness="different")
    with warnings.catch_warnings():  # "performance drop ... batching rule" for CPU SDPA
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return fn(params, batched)
