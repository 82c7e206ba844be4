"""Grad samplers: one function per layer type turns a recorded call into `Usage` records.

A grad sampler takes the module, its input ``x`` and the gradient ``g`` of the loss with respect
to its output (both batch-first) and returns ``{parameter name: Usage}`` for the module's own
parameters. Register one with ``@register_grad_sampler(LayerType)`` in a file of this package
(and import that file in ``__init__.py``); a subclass of a registered type uses its parent's
sampler. Layers without one go through `functorch_grads`, which materialises the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .functorch import functorch_grads
from .usage import Call, Usage

GradSampler = Callable[[Any, Tensor, Tensor], dict[str, Usage]]
GRAD_SAMPLERS: dict[type[nn.Module], GradSampler] = {}


def register_grad_sampler(*layer_types: type[nn.Module]) -> Callable[[GradSampler], GradSampler]:
    """Decorator: `fn(module, x, g) -> {name: Usage}` computes the usages of these layer types."""

    def register(fn: GradSampler) -> GradSampler:
        for layer_type in layer_types:
            GRAD_SAMPLERS[layer_type] = fn
        return fn

    return register


def grad_sampler_for(module: nn.Module) -> GradSampler | None:
    """The sampler registered for `module`'s class or its nearest registered base class."""
    for cls in type(module).__mro__:
        fn = GRAD_SAMPLERS.get(cls)
        if fn is not None:
            return fn
    return None


def usages_of(call: Call) -> list[Usage]:
    """Translate one recorded forward call into per-parameter `Usage` records."""
    m, g = call.module, call.grad
    assert g is not None
    b = g.shape[0]
    x = call.args[0] if call.args else call.kwargs.get("input")
    wanted = {n for n, _ in call.params}
    if call.batch is not None and b != call.batch:
        raise UnsupportedModuleError(
            call.path,
            type(m).__name__,
            f"output has leading dimension {b} but the batch has "
            f"{call.batch} samples; per-sample gradients need batch-first module outputs",
        )
    if isinstance(x, Tensor) and x.shape[0] != b:
        raise UnsupportedModuleError(
            call.path,
            type(m).__name__,
            f"input batch dimension {x.shape[0]} differs from its "
            f"output gradient's {b}; inputs must be batch-first",
        )
    sampler = grad_sampler_for(m)
    if sampler is None:
        dense = functorch_grads(call)
        found = {n: Usage(getattr(m, n), kind="dense", dense=d) for n, d in dense.items()}
    else:
        assert isinstance(x, Tensor)
        found = sampler(m, x, g)
    return [u for name, u in found.items() if name in wanted]
