"""Learned diffs: local training constrained so the update is small by construction.

`SparseDiff` prunes the diff from the global weights to a target density along the local
steps (gradual magnitude pruning), masking the trainable parameters after every optimizer step;
`HashedDiff` keeps the diff in a random hashed subspace (HashedNets-style shared weights) by
turning every gradient into its bucket's before each step.

Privacy: the mask and the projection are functions of the trained weights only (under
sample-level DP, of the DP iterates) and of public randomness, so they are post-processing
and cost no extra privacy budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .codecs import Update
from .hashing import hashed_subspace
from .selection import largest_mask
from .settings import CompressionSettings

Params = Mapping[str, torch.Tensor]


class SparseDiff:
    """Gradual magnitude pruning of the diff p - base to `density` of all its entries.

    At `prune_events` steps spread evenly up to ceil(prune_until * total_steps), the mask
    shrinks to the globally largest |p - base| among the entries still kept, with the cubic
    schedule density_e = target + (1 - target) * (1 - e / E)^3, so the last event reaches the
    target. After every step pruned entries are reset to base. A pruned entry never returns.
    Cost: one global selection per event, an elementwise select per step. The mask depends on the
    trained weights only (under DP-SGD, on the DP iterates): post-processing, no privacy cost.
    `base` should sit on the parameters' device; it is copied.
    """

    def __init__(
        self,
        base: Params,
        density: float,
        total_steps: int,
        prune_until: float = 0.75,
        prune_events: int = 4,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps: {total_steps} is < 1")
        # a copy: callers often pass detached views of the parameters being trained
        self.base = {name: t.detach().clone() for name, t in base.items()}
        self.mask = {name: torch.ones_like(t, dtype=torch.bool) for name, t in self.base.items()}
        self.entries = sum(t.numel() for t in self.base.values())
        self.target = min(self.entries, max(1, round(density * self.entries)))
        self.kept = self.entries
        last = math.ceil(prune_until * total_steps)
        self.schedule: dict[int, int] = {}
        for event in range(1, prune_events + 1):
            fraction = density + (1 - density) * (1 - event / prune_events) ** 3
            count = max(self.target, round(fraction * self.entries))
            # later events overwrite earlier ones on the same step (few steps: deduped)
            self.schedule[max(1, math.ceil(event * last / prune_events))] = count
        self.schedule[last] = self.target

    @torch.no_grad()
    def after_step(self, params: Params, step: int) -> None:
        """Call after optimizer step number `step` (1-based): prune if due, then mask."""
        if step in self.schedule:
            self._prune(params, self.schedule[step])
        if self.kept < self.entries:
            self._apply(params)

    @torch.no_grad()
    def finish(self, params: Params) -> Update:
        """Enforce the target density (training may stop early) and return the diff."""
        self._prune(params, self.target)
        self._apply(params)
        return {
            name: torch.where(self.mask[name], params[name] - base, 0.0)
            for name, base in self.base.items()
        }

    def _prune(self, params: Params, count: int) -> None:
        if count >= self.kept:
            return
        # pruned entries score -1, below every kept |diff|, so the mask only shrinks
        scores = torch.cat(
            [
                torch.where(self.mask[name], (params[name] - base).abs(), -1.0).reshape(-1)
                for name, base in self.base.items()
            ]
        )
        keep = largest_mask(scores, count)
        offset = 0
        for mask in self.mask.values():
            mask.copy_(keep[offset : offset + mask.numel()].view_as(mask))
            offset += mask.numel()
        self.kept = count

    def _apply(self, params: Params) -> None:
        for name, base in self.base.items():
            torch.where(self.mask[name], params[name], base, out=params[name])


class HashedDiff:
    """Training in a hashed subspace: p = base + expand(b), the buckets b trained through the
    chain rule (`before_step`); `finish` returns base's diff projected onto the subspace.

    Only `buckets` numbers need to be sent. The projection uses the gradients (under DP, the
    noised ones), the weights and the public seed only: post-processing of DP iterates.
    """

    def __init__(self, base: Params, buckets: int, seed: int, decay: bool = False) -> None:
        self.base = {name: t.detach().clone() for name, t in base.items()}
        shapes = {name: tuple(t.shape) for name, t in self.base.items()}
        self.subspace = hashed_subspace(shapes, buckets, seed)  # the one `encode` will use
        self.decay = decay

    @torch.no_grad()
    def before_step(self, params: Params) -> None:
        """Call before every optimizer step (after DP noise): each weight's gradient becomes
        s_j * (the gradient of its bucket), the chain rule of w = base + expand(b). Every weight
        of a bucket then sees the same gradient up to its sign, so an optimizer with
        per-coordinate state (Adam) moves the bucket as one coordinate: training the buckets,
        not the weights."""
        grads = {
            n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()
        }
        expanded = self.subspace.expand(self.subspace.project(grads, mean=False))
        for name, param in params.items():
            if param.grad is not None:
                param.grad.copy_(expanded[name])

    @torch.no_grad()
    def after_step(self, params: Params, step: int) -> None:
        """After `before_step` the step itself stays in the subspace (SGD, momentum and Adam
        move every weight of a bucket alike, up to its sign), so nothing is done, saving two
        passes over the model a step. Weight decay pulls weights out of it: with `decay` the
        diff is projected back after every step."""
        if self.decay:
            self._project(params)

    @torch.no_grad()
    def finish(self, params: Params) -> Update:
        """The diff p - base, in the subspace."""
        return self._project(params)

    def _project(self, params: Params) -> Update:
        diff = {name: params[name] - base for name, base in self.base.items()}
        diff = self.subspace.expand(self.subspace.project(diff))
        for name, base in self.base.items():
            params[name].copy_(base + diff[name])
        return diff


def make_diff(
    settings: CompressionSettings,
    base: Params,
    total_steps: int,
    seed: int,
    weight_decay: float = 0.0,
) -> SparseDiff | HashedDiff | None:
    """The learned-diff constraint for `settings` (None for methods that compress after
    training). Use the same `seed` in `encode` for hashed-diff; give the optimizer's
    `weight_decay` (a hashed diff then projects after every step)."""
    settings.check()
    if settings.method == "sparse-diff":
        return SparseDiff(
            base, settings.density, total_steps, settings.prune_until, settings.prune_events
        )
    if settings.method == "hashed-diff":
        entries = sum(t.numel() for t in base.values())
        return HashedDiff(base, settings.bucket_count(entries), seed, decay=weight_decay > 0)
    return None
