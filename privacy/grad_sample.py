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

Supported without materialising: ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` and
transformers' ``Conv1D`` (GPT-2). Any other leaf module with trainable parameters goes through a
``torch.func`` (functional_call + vmap + vjp) path that materialises its per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .errors import UnsupportedModuleError

try:  # transformers is optional for the engine itself
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency of fedtrust
    Conv1D = None  # type: ignore[assignment,misc]

_FAST = (nn.Linear, nn.Embedding, nn.LayerNorm) + ((Conv1D,) if Conv1D is not None else ())
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "x", "input")


@dataclass
class Usage:
    """One use of one parameter in one forward call, as a batch of per-sample gradients.

    kind ``"outer"``: grad_i = Σ_t left[i,t]ᵀ ⊗ right[i,t] (shape rows × cols).
    kind ``"embed"``: the same with ``left`` an index tensor (B, T) standing for one-hot rows.
    kind ``"dense"``: ``dense`` holds the per-sample gradients (B, *param.shape).
    """

    param: nn.Parameter
    kind: str
    left: Tensor | None = None
    right: Tensor | None = None
    dense: Tensor | None = None

    @property
    def batch_size(self) -> int:
        ref = self.dense if self.kind == "dense" else self.right
        assert ref is not None
        return ref.shape[0]


@dataclass
class _Call:
    module: nn.Module
    path: str
    group: int
    batch: int | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    params: list[tuple[str, nn.Parameter]]
    grad: Tensor | None = field(default=None)

    released: bool = False

    def add_grad(self, g: Tensor) -> None:
        if not self.released:  # a processed record ignores late gradients
            self.grad = g if self.grad is None else self.grad + g

    def release(self) -> None:
        """Drop the tensors: the autograd graph (alive while the user holds `loss`) keeps the
        output hook, and through it this record, until the next forward."""
        self.args, self.kwargs, self.grad, self.released = (), {}, None, True


def _param_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[tuple[str, Any]]]]:
    for path, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            yield path, module, own


def check_module(path: str, module: nn.Module) -> None:
    """Raise `UnsupportedModuleError` if `module` (with trainable parameters) is unsupported."""
    cls = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModuleError(
            path,
            cls,
            "BatchNorm mixes the samples of a batch (even when frozen); replace it "
            "with GroupNorm or LayerNorm (opacus.validators.ModuleValidator.fix does this)",
        )
    if isinstance(module, nn.RNNBase):
        raise UnsupportedModuleError(
            path,
            cls,
            "recurrent modules are not supported; use opacus.layers.DPLSTM/DPGRU or freeze it",
        )
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        raise UnsupportedModuleError(
            path, cls, "scale_grad_by_freq=True couples samples; set it to False or freeze it"
        )
    if not isinstance(module, _FAST):
        trainable_children = [
            n for n, p in module.named_parameters() if p.requires_grad and "." in n
        ]
        if trainable_children:
            raise UnsupportedModuleError(
                path,
                cls,
                "owns trainable parameters and has trainable submodules "
                f"(e.g. {trainable_children[0]}); move its own parameters into a leaf module "
                "or freeze them",
            )


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for key in _BATCH_KEYS:
        value = kwargs.get(key)
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class PerSampleHooks:
    """Hooks on `model` that record per-sample gradient factors; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "_fedtrust_dp_hooks", None) is not None:
            raise ValueError("this model is already attached to a PrivacyEngine; call detach()")
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise ValueError(
                "gradient checkpointing re-runs forward during backward and is not supported "
                "with DP; call model.gradient_checkpointing_disable()"
            )
        self.model = model
        self.pending: list[_Call] = []
        self.params: dict[int, tuple[str, nn.Parameter]] = {}
        names = {id(p): n for n, p in model.named_parameters()}
        self._handles: list[Any] = []
        self._group = 0
        self._depth = 0
        self._batch: int | None = None
        self._frozen: list[nn.Parameter] = []
        self._frozen_ids: set[int] = set()
        for path, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                check_module(path, module)
        for path, module, own in _param_owners(model):
            check_module(path, module)
            for _, p in own:
                self.params[id(p)] = (names[id(p)], p)
            if isinstance(module, nn.Embedding):
                self._handles.append(module.register_forward_pre_hook(self._expand_batch))
            self._handles.append(
                module.register_forward_hook(self._make_hook(path), with_kwargs=True)
            )
        self._handles.append(model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._root_post, always_call=True))
        model._fedtrust_dp_hooks = self  # type: ignore[assignment]

    # -- root: batch size, and no autograd for the parameters during forward ------------------
    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1 or not torch.is_grad_enabled():
            return
        self._group += 1
        self._batch = _batch_size(args, kwargs)
        self._frozen = [p for _, p in self.params.values() if p.requires_grad]
        self._frozen_ids = {id(p) for p in self._frozen}
        for p in self._frozen:
            p.requires_grad_(False)

    def _root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        self._frozen_ids = set()
        self._batch = None

    def _expand_batch(self, module: nn.Module, args: tuple) -> tuple | None:
        # transformers builds position ids of shape (1, T) and relies on broadcasting; expand them
        # to (B, T) so the embedding's output gradient stays per sample.
        x = args[0] if args else None
        b = self._batch
        if isinstance(x, Tensor) and b is not None and b > 1 and x.dim() >= 1 and x.shape[0] == 1:
            return (x.expand(b, *x.shape[1:]), *args[1:])
        return None

    # -- leaves: keep inputs and output gradients ---------------------------------------------
    def _make_hook(self, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not torch.is_grad_enabled():
                return None
            params = [
                (n, p)
                for n, p in module.named_parameters(recurse=False)
                if id(p) in self.params and (p.requires_grad or id(p) in self._frozen_ids)
            ]
            if not params:
                return None
            if not isinstance(output, Tensor):
                raise UnsupportedModuleError(
                    path,
                    type(module).__name__,
                    "returns a non-tensor; per-sample gradients "
                    "need a module returning one tensor; freeze it",
                )
            saved = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            call = _Call(
                module, path, self._group if self._depth else 0, self._batch, saved, kwargs, params
            )
            out = output
            if not out.requires_grad:  # first trainable layer: make its output a graph input
                out = output.detach().requires_grad_().clone()
            out.register_hook(lambda g: call.add_grad(g.detach()))
            self.pending.append(call)
            return out if out is not output else None

        return hook

    def take(self) -> list[list[Usage]]:
        """Per forward group, the `Usage` records of the calls that got a gradient; clears."""
        calls, self.pending = self.pending, []
        groups: dict[int, list[Usage]] = {}
        for call in calls:
            if call.grad is not None:
                groups.setdefault(call.group, []).extend(usages_of(call))
            call.release()
        return list(groups.values())

    def clear(self, stale_only: bool = False) -> None:
        """Drop recorded calls; with `stale_only`, keep those still waiting for their backward
        (so ``forward; zero_grad(); backward; step()`` works)."""
        keep = []
        for call in self.pending:
            if stale_only and call.grad is None:
                keep.append(call)
            else:
                call.release()
        self.pending = keep

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.pending = []
        self.model._fedtrust_dp_hooks = None  # type: ignore[assignment]


def _rows(t: Tensor, b: int, width: int | tuple[int, ...]) -> Tensor:
    tail = (width,) if isinstance(width, int) else tuple(width)
    return t.reshape(b, -1, *tail)


def usages_of(call: _Call) -> list[Usage]:
    """Translate one recorded forward call into per-parameter `Usage` records."""
    m, g = call.module, call.grad
    assert g is not None
    b = g.shape[0]
    x = call.args[0] if call.args else call.kwargs.get("input")
    wanted = {n for n, _ in call.params}
    out: list[Usage] = []

    def add(name: str, **kw: Any) -> None:
        if name in wanted:
            out.append(Usage(getattr(m, name), **kw))

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
    if isinstance(m, nn.Linear) or (Conv1D is not None and isinstance(m, Conv1D)):
        assert isinstance(x, Tensor)
        gg = _rows(g, b, g.shape[-1])
        aa = _rows(x, b, x.shape[-1]).to(gg.dtype)
        if isinstance(m, nn.Linear):
            add("weight", kind="outer", left=gg, right=aa)
        else:
            add("weight", kind="outer", left=aa, right=gg)
        add("bias", kind="dense", dense=gg.sum(1))
    elif isinstance(m, nn.Embedding):
        assert isinstance(x, Tensor)
        idx = x.reshape(b, -1)
        gg = _rows(g, b, g.shape[-1])
        if m.padding_idx is not None:
            gg = gg.masked_fill((idx == m.padding_idx).unsqueeze(-1), 0.0)
        add("weight", kind="embed", left=idx, right=gg)
    elif isinstance(m, nn.LayerNorm):
        assert isinstance(x, Tensor)
        shape = tuple(m.normalized_shape)
        xhat = F.layer_norm(x.detach().to(g.dtype), shape, None, None, m.eps)
        gg = _rows(g, b, shape)
        add("weight", kind="dense", dense=(gg * _rows(xhat, b, shape)).sum(1))
        add("bias", kind="dense", dense=gg.sum(1))
    else:
        for name, dense in functorch_grads(call).items():
            add(name, kind="dense", dense=dense)
    return out


def functorch_grads(call: _Call) -> dict[str, Tensor]:
    """Per-sample gradients of one module call by vmap over vjp (the generic, slower path)."""
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
