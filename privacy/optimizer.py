"""`DPOptimizer`: wraps any torch optimizer; clips per sample, adds noise once per logical batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .clipping import CLIPPING_MODES, clip_factors, clipped_sum, per_sample_norms
from .grad_sample import PerSampleHooks
from .noise import fresh_generator

ClippedSumHook = Callable[[list[torch.nn.Parameter], dict[int, Tensor]], None]


class DPOptimizer(Optimizer):
    """Behaves like the wrapped optimizer; ``step()`` does the DP-SGD work first.

    On every ``step()`` the per-sample gradients recorded since the last step are clipped and
    summed (no per-sample gradient is materialised for Linear/Embedding layers). On the last
    micro-batch of a logical batch it then adds N(0, (σC)²) noise to the sum, divides by the
    expected batch size, writes ``p.grad`` and calls the wrapped optimizer's ``step()``.

    Noise comes from `generator` when one is given (reproducible, and replayable by whoever
    holds its seed); by default every step draws from a fresh generator seeded from OS entropy
    (`fedtrust.privacy.noise`). `clipped_sum_hook(params, sums)`, if set, may add to the clipped
    sums just before the noise (the one-run audit's gradient canaries); `sums` maps ``id(p)`` to
    the sum and may lack parameters that no sample touched.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        hooks: PerSampleHooks,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        clipping: str = "flat",
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        before_step: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.original_optimizer = optimizer
        self.hooks = hooks
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.clipping = clipping
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.clipped_sum_hook: ClippedSumHook | None = None
        self._before_step = before_step
        self._after_step = after_step
        self._summed: dict[int, Tensor] = {}
        self._samples = 0
        self._skip_next = False
        self.last_per_sample_norms: Tensor | None = None
        self.last_batch_samples = 0

    # -- delegation to the wrapped optimizer ---------------------------------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    # -- DP-SGD ----------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` and records whose backward already ran but were never stepped.

        Records of a forward still waiting for its backward and the clipped sums of the current
        logical batch (micro-batches) are kept.
        """
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.hooks.clear(stale_only=True)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next ``step()`` only accumulate (a micro-batch that is not the last)."""
        self._skip_next = do_skip

    def begin_logical_batch(self) -> None:
        """Drop clipped sums left over from an unfinished logical batch (e.g. a ``break``)."""
        if self._summed:
            warnings.warn(
                "discarding clipped gradients of an unfinished logical batch", stacklevel=2
            )
        self._summed, self._samples = {}, 0
        self.hooks.clear()

    def accumulate(self) -> int:
        """Clip the recorded per-sample gradients and add them to the running sums."""
        added = 0
        for usages in self.hooks.take():
            if not usages:
                continue
            b = usages[0].batch_size
            if any(u.batch_size != b for u in usages):
                raise RuntimeError(
                    "per-sample gradients of one forward have different batch "
                    "sizes; inputs of every layer must be batch-first"
                )
            if b == 0:
                continue
            scale = float(b) if self.loss_reduction == "mean" else 1.0
            norms = per_sample_norms(usages) * scale
            coef = clip_factors(norms, self.max_grad_norm, self.clipping) * scale
            clipped_sum(usages, coef, self._summed)
            self.last_per_sample_norms = norms.detach()
            added += b
        self._samples += added
        return added

    def _params(self) -> list[torch.nn.Parameter]:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if id(p) not in self.hooks.params:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} became trainable after "
                        "make_private; it has no per-sample gradient; call make_private again"
                    )
                out.append(p)
        return out

    def _noisy_step(self) -> Any:
        try:
            if self._before_step is not None:
                self._before_step()
        except BaseException:
            self._summed, self._samples = {}, 0
            self.original_optimizer.zero_grad(set_to_none=True)
            raise
        std = self.noise_multiplier * self.max_grad_norm
        denom = self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        params = self._params()
        if self.clipped_sum_hook is not None:
            self.clipped_sum_hook(params, self._summed)
        generator = self.generator
        for p in params:
            s = self._summed.get(id(p))
            if s is None:
                s = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if std > 0:
                if generator is None:
                    generator = fresh_generator(s.device)
                self._add_noise(s, std, generator)
            p.grad = s.div_(denom).to(p.dtype)
        self.last_batch_samples = self._samples
        self._summed, self._samples = {}, 0
        out = self.original_optimizer.step()
        if self._after_step is not None:
            self._after_step()
        return out

    @staticmethod
    def _add_noise(s: Tensor, std: float, generator: torch.Generator, chunk: int = 1 << 22) -> None:
        """s += N(0, std²) elementwise, drawn in chunks so big tables need no full-size copy."""
        flat = s.view(-1)
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk]
            part.add_(torch.empty_like(part).normal_(0.0, std, generator=generator))

    def noise_only_step(self) -> Any:
        """A step for an empty logical batch: noise only, counted by the accountant."""
        self._summed, self._samples = {}, 0
        self.hooks.clear()
        return self._noisy_step()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.accumulate()
        if self._skip_next:
            self._skip_next = False
            self.original_optimizer.zero_grad(set_to_none=True)
            return loss
        out = self._noisy_step()
        return loss if closure is not None else out
