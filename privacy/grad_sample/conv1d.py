"""transformers' `Conv1D` (GPT-2): a Linear layer whose weight is stored transposed (in, out)."""

from __future__ import annotations

from torch import Tensor, nn

from .linear import affine_usages
from .registry import register_grad_sampler
from .usage import Usage

try:  # optional: registered only where transformers is installed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers comes with fedtrust[federated]
    Conv1D = None


def conv1d_usages(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Usage]:
    return affine_usages(module.weight, module.bias, x, g, in_out=True)


if Conv1D is not None:
    register_grad_sampler(Conv1D)(conv1d_usages)
