"""`nn.LayerNorm`: per sample, weight Σ_t g_t ⊙ x̂_t (x̂ the normalised input), bias Σ_t g_t."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_grad_sampler
from .usage import Usage, rows


@register_grad_sampler(nn.LayerNorm)
def layer_norm_usages(module: nn.LayerNorm, x: Tensor, g: Tensor) -> dict[str, Usage]:
    b = g.shape[0]
    shape = tuple(module.normalized_shape)
    xhat = F.layer_norm(x.detach().to(g.dtype), shape, None, None, module.eps)
    gg = rows(g, b, shape)
    out = {}
    if module.weight is not None:
        out["weight"] = Usage(module.weight, kind="dense", dense=(gg * rows(xhat, b, shape)).sum(1))
    if module.bias is not None:
        out["bias"] = Usage(module.bias, kind="dense", dense=gg.sum(1))
    return out
