"""Per-sample gradient norms (ghost norms) and clipped sums (book-keeping), batched.

For a parameter used by several calls (tied weights, reused modules) the per-sample gradient is
the sum of the uses, so its squared norm is Σ_u ||g_u||² + 2 Σ_{u<v} <g_u, g_v>. Every inner
product of two factored uses is computed from two T×T Gram matrices::

    <Σ_s L_sᵀ R_s, Σ_t M_tᵀ Q_t> = Σ_{s,t} <L_s, M_t> <R_s, Q_t>

where a one-hot (embedding) left factor turns ``<L_s, M_t>`` into a gather or an index equality.
A use is materialised instead when that is cheaper (Linear: T·(rows+cols) > rows·cols, e.g.
long sequences; Embedding: a table no larger than T², e.g. token types).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .grad_sample import Usage

AUTOMATIC_GAMMA = 0.01
CLIPPING_MODES = ("flat", "automatic")


class _Grams:
    """Batched Gram matrices ``a @ bᵀ`` cached by storage, so Q/K/V share one ``A Aᵀ``."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Tensor] = {}

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        key = (self._key(a), self._key(b))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = torch.bmm(a, b.transpose(1, 2))
        return hit


def to_dense(u: Usage) -> Tensor:
    """Materialise a use's per-sample gradients as (B, *param.shape)."""
    if u.kind == "dense":
        assert u.dense is not None
        return u.dense
    assert u.left is not None and u.right is not None
    if u.kind == "outer":
        return torch.bmm(u.left.transpose(1, 2), u.right)
    b, t = u.left.shape
    v, d = u.param.shape
    rows = (u.left + torch.arange(b, device=u.left.device).unsqueeze(1) * v).reshape(-1)
    out = torch.zeros(b * v, d, dtype=u.right.dtype, device=u.right.device)
    out.index_add_(0, rows, u.right.reshape(-1, d))
    return out.view(b, v, d)


def _left_gram(u: Usage, w: Usage, grams: _Grams) -> Tensor:
    assert u.left is not None and w.left is not None and u.right is not None
    if u.kind == "embed" and w.kind == "embed":
        return (u.left.unsqueeze(2) == w.left.unsqueeze(1)).to(u.right.dtype)
    if u.kind == "embed":
        return _left_gram(w, u, grams).transpose(1, 2)
    if w.kind == "embed":  # <L_s, onehot(idx_t)> = L[s, idx_t]
        idx = w.left.unsqueeze(1).expand(-1, u.left.shape[1], -1)
        return torch.gather(u.left, 2, idx)
    return grams(u.left, w.left)


def _inner(u: Usage, w: Usage, grams: _Grams) -> Tensor:
    if u.kind == "dense" or w.kind == "dense":
        return (to_dense(u) * to_dense(w)).flatten(1).sum(1)
    assert u.right is not None and w.right is not None
    return (_left_gram(u, w, grams) * grams(u.right, w.right)).sum((1, 2))


def _self_sq_norm(u: Usage, grams: _Grams) -> Tensor:
    if u.kind == "outer":
        assert u.left is not None and u.right is not None
        t, rows, cols = u.left.shape[1], u.left.shape[2], u.right.shape[2]
        if t * (rows + cols) > rows * cols:
            return to_dense(u).pow(2).sum((1, 2))
    elif u.kind == "embed":
        assert u.left is not None
        if u.param.numel() <= u.left.shape[1] ** 2:  # tiny table (token types): materialise
            return to_dense(u).pow(2).sum((1, 2))
    else:
        return to_dense(u).pow(2).flatten(1).sum(1)
    return _inner(u, u, grams)


def _by_param(usages: Sequence[Usage]) -> dict[int, list[Usage]]:
    groups: dict[int, list[Usage]] = {}
    for u in usages:
        groups.setdefault(id(u.param), []).append(u)
    return groups


def per_sample_sq_norms(usages: Sequence[Usage]) -> dict[int, Tensor]:
    """Per parameter (keyed by ``id``), each sample's squared gradient norm, shape (B,)."""
    grams = _Grams()
    out: dict[int, Tensor] = {}
    for key, uses in _by_param(usages).items():
        total = sum(_self_sq_norm(u, grams) for u in uses)
        for i, u in enumerate(uses):
            for w in uses[i + 1 :]:
                total = total + 2 * _inner(u, w, grams)
        out[key] = total  # type: ignore[assignment]
    return out


def per_sample_norms(usages: Sequence[Usage]) -> Tensor:
    """Each sample's gradient norm over all parameters, shape (B,), float32 or float64."""
    if not usages:
        raise ValueError("no per-sample gradients were recorded")
    sq = per_sample_sq_norms(usages).values()
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sq) else torch.float32
    return torch.stack([s.to(dtype) for s in sq]).sum(0).clamp_min(0).sqrt()


def clip_factors(norms: Tensor, max_grad_norm: float, mode: str = "flat") -> Tensor:
    """Per-sample factors c_i: flat ``min(1, C/||g_i||)``, automatic ``C/(||g_i|| + 0.01)``.

    Either way ``||c_i g_i|| <= C``, so the sensitivity of the clipped sum is C.
    """
    if mode == "flat":
        return (max_grad_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    if mode == "automatic":
        return max_grad_norm / (norms + AUTOMATIC_GAMMA)
    raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {mode!r}")


def clipped_sum(usages: Sequence[Usage], coef: Tensor, out: dict[int, Tensor]) -> None:
    """Add Σ_i coef_i g_i for every parameter into ``out[id(param)]`` (no per-sample grads)."""
    for u in usages:
        p = u.param
        acc = out.get(id(p))
        if acc is None:
            acc = out[id(p)] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if u.kind == "dense":
            assert u.dense is not None
            acc.add_(torch.tensordot(coef.to(u.dense.dtype), u.dense, dims=1))
            continue
        assert u.left is not None and u.right is not None
        c = coef.to(u.right.dtype).view(-1, 1, 1)
        right = u.right.reshape(-1, u.right.shape[-1])
        if u.kind == "embed":
            acc.index_add_(0, u.left.reshape(-1), (u.right * c).reshape(right.shape))
        elif u.left.shape[-1] <= u.right.shape[-1]:
            left = (u.left * c).reshape(-1, u.left.shape[-1])
            acc.addmm_(left.t(), right.to(acc.dtype))
        else:
            left = u.left.reshape(-1, u.left.shape[-1])
            acc.addmm_(left.t(), (u.right * c).reshape(right.shape))


def per_sample_gradients(usages: Sequence[Usage]) -> dict[int, Tensor]:
    """Materialised per-sample gradients per parameter (tests, debugging; memory-hungry)."""
    out: dict[int, Tensor] = {}
    for key, uses in _by_param(usages).items():
        out[key] = sum(to_dense(u) for u in uses)  # type: ignore[assignment]
    return out
