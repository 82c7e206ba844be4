"""The records per-sample gradients are made of: a recorded module call and its `Usage`s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


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
class Call:
    """One forward call of a module with trainable parameters: its inputs and, after the
    backward pass, the gradient of the loss with respect to its output."""

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


def rows(t: Tensor, b: int, width: int | tuple[int, ...]) -> Tensor:
    """`t` as (B, T, *width): every position of every sample one row."""
    tail = (width,) if isinstance(width, int) else tuple(width)
    return t.reshape(b, -1, *tail)
