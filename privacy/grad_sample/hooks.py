"""`PerSampleHooks`: record every trainable module call's inputs and output gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .registry import grad_sampler_for, usages_of
from .usage import Call, Usage

_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "x", "input")


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
    if grad_sampler_for(module) is None:
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
    """Hooks on `model` that record per-sample gradient factors; see the package docstring."""

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "_fedtrust_dp_hooks", None) is not None:
            raise ValueError("this model is already attached to a PrivacyEngine; call detach()")
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise ValueError(
                "gradient checkpointing re-runs forward during backward and is not supported "
                "with DP; call model.gradient_checkpointing_disable()"
            )
        self.model = model
        self.pending: list[Call] = []
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
            call = Call(
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
