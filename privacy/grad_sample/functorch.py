"""Per-sample gradients of one module call by vmap over vjp: the generic, slower path for any
layer without a registered grad sampler (it materialises the per-sample gradients)."""

from __future__ import annotations

from torch import Tensor
from torch.func import functional_call, grad, vmap

from ..errors import UnsupportedModuleError
from .usage import Call


def functorch_grads(call: Call) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (B, *shape)}`` of the call's trainable parameters."""
    m, g = call.module, call.grad
    assert g is not None
    b = g.shape[0]
    names = [n for n, _ in call.params]
    trainable = {n: p.detach() for n, p in call.params}
    fixed = {n: p.detach() for n, p in m.named_parameters() if n not in trainable}
    fixed.update(dict(m.named_buffers()))
    batched = [isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == b for a in call.args]
    if not any(batched):
        raise UnsupportedModuleError(
            call.path, type(m).__name__, "no batch-first tensor input found; freeze it"
        )

    def f(params: dict[str, Tensor], args: tuple, g_i: Tensor) -> Tensor:
        args1 = tuple(a.unsqueeze(0) if bt else a for a, bt in zip(args, batched, strict=True))
        out = functional_call(m, {**fixed, **params}, args1, call.kwargs)
        return (out * g_i.unsqueeze(0)).sum()

    in_dims = (None, tuple(0 if bt else None for bt in batched), 0)
    try:
        grads = vmap(grad(f), in_dims=in_dims)(trainable, tuple(call.args), g)
    except Exception as exc:  # noqa: BLE001 - reported with the module path
        raise UnsupportedModuleError(
            call.path,
            type(m).__name__,
            f"per-sample gradient via torch.func failed ({exc}); "
            "freeze it or replace it with a supported layer",
        ) from exc
    return {n: grads[n] for n in names}
