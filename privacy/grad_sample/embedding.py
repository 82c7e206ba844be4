"""`nn.Embedding`: the per-sample gradient adds g_t to the row of token t (one-hot outer)."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_grad_sampler
from .usage import Usage, rows


@register_grad_sampler(nn.Embedding)
def embedding_usages(module: nn.Embedding, x: Tensor, g: Tensor) -> dict[str, Usage]:
    b = g.shape[0]
    idx = x.reshape(b, -1)
    gg = rows(g, b, g.shape[-1])
    if module.padding_idx is not None:
        gg = gg.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
    return {"weight": Usage(module.weight, kind="embed", left=idx, right=gg)}
