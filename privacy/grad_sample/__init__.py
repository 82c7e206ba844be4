"""Capture what per-sample gradients are made of, in one ordinary backward pass.

`PerSampleHooks` attaches to a model in place (parameter names stay as they are). For every
forward of a module that owns trainable parameters it keeps the module's inputs, and through a
tensor hook on the module's output it keeps the gradient of the loss with respect to that output.
From these two, `Usage` records describe each sample's gradient in factored form, e.g. a Linear
layer's per-sample weight gradient is ``G_iᵀ A_i`` with ``G_i`` (T×out) and ``A_i`` (T×in);
`fedtrust.privacy.clipping` turns them into norms and clipped sums without materialising them.

While the root module runs forward with gradients enabled, the trainable parameters are switched
to ``requires_grad=False`` so autograd never computes the (non-private) summed weight gradients:
the backward pass only propagates activation gradients, and the book-keeping einsum in
`clipping.clipped_sum` computes the clipped sum instead, so DP costs no second backward.

Supported without materialising: every layer type with a grad sampler in this package, one file
each (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, transformers' ``Conv1D`` of GPT-2);
supporting another layer is one more file with a function registered by
`register_grad_sampler`, imported below. Any other leaf module with trainable parameters goes
through a ``torch.func`` (functional_call + vmap + vjp) path that materialises its per-sample
gradients.
"""

from __future__ import annotations

from . import conv1d, embedding, layer_norm, linear  # noqa: F401 - each registers its layer
from .functorch import functorch_grads
from .hooks import PerSampleHooks, check_module
from .registry import GRAD_SAMPLERS, grad_sampler_for, register_grad_sampler, usages_of
from .usage import Call, Usage

__all__ = [
    "GRAD_SAMPLERS",
    "Call",
    "PerSampleHooks",
    "Usage",
    "check_module",
    "functorch_grads",
    "grad_sampler_for",
    "register_grad_sampler",
    "usages_of",
]
