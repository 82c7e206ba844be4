"""`nn.Linear`: the weight's per-sample gradient is Σ_t g_tᵀ x_t (outer), the bias's Σ_t g_t."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_grad_sampler
from .usage import Usage, rows


def affine_usages(
    weight: nn.Parameter, bias: nn.Parameter | None, x: Tensor, g: Tensor, in_out: bool = False
) -> dict[str, Usage]:
    """Usages of y = x W + b: weight stored (out, in) like `nn.Linear`, or (in, out) if `in_out`."""
    b = g.shape[0]
    gg = rows(g, b, g.shape[-1])
    aa = rows(x, b, x.shape[-1]).to(gg.dtype)
    left, right = (aa, gg) if in_out else (gg, aa)
    out = {"weight": Usage(weight, kind="outer", left=left, right=right)}
    if bias is not None:
        out["bias"] = Usage(bias, kind="dense", dense=gg.sum(1))
    return out


@register_grad_sampler(nn.Linear)
def linear_usages(module: nn.Linear, x: Tensor, g: Tensor) -> dict[str, Usage]:
    return affine_usages(module.weight, module.bias, x, g)
