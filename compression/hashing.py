"""A random hashed subspace of model updates (HashedNets-style shared diff weights).

Position j of tensor t maps to bucket h_t(j) with sign s_t(j); a bucket vector b expands to
the update diff_j = s_t(j) * b_t[h_t(j)]. The hash is drawn from (seed, crc32(name)), so a
server rebuilds the same subspace from the tensor shapes, the bucket total and the seed alone.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping, Sequence

import torch

from fedtrust.errors import ConfigError

from .packing import generator

Update = dict[str, torch.Tensor]


class HashedSubspace:
    """The span of one signed indicator vector per bucket; `buckets` in total, split over the
    tensors by `split_buckets`.

    The basis vectors have disjoint supports, so least squares is a per-bucket mean and
    `expand(project(u))` is the orthogonal projection of u onto the subspace.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], buckets: int, seed: int) -> None:
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.seed = int(seed) % 2**32
        numels = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self.sizes = split_buckets(numels, buckets)
        self.buckets = buckets
        # name -> device -> (signed slot, bucket population >= 1); drawn once on the CPU
        self._cache: dict[str, dict[torch.device, tuple[torch.Tensor, ...]]] = {}

    def expand(self, bucket_values: Mapping[str, torch.Tensor]) -> Update:
        """The update these bucket values stand for (on the values' device)."""
        out = {}
        for name, shape in self.shapes.items():
            values = bucket_values[name].reshape(-1)
            slot, _ = self._hash(name, values.device)
            out[name] = torch.cat([values, -values]).index_select(0, slot).reshape(shape)
        return out

    def project(self, update: Mapping[str, torch.Tensor], mean: bool = True) -> Update:
        """Least-squares bucket values of `update`: the mean of s_j * diff_j per bucket (an
        empty bucket gets 0). `mean=False`: the sums, i.e. the gradient with respect to the
        bucket values when `update` is the gradient with respect to the weights."""
        out = {}
        for name, size in self.sizes.items():
            flat = update[name].detach().reshape(-1)
            slot, population = self._hash(name, flat.device)
            signed = torch.zeros(2 * size, dtype=flat.dtype, device=flat.device)
            signed.index_add_(0, slot, flat)
            sums = signed[:size] - signed[size:]
            # an empty bucket sums to 0 and is divided by 1
            out[name] = sums / population.to(flat.dtype) if mean else sums
        return out

    def _hash(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, bucket population >= 1): entry j's slot is h(j) when its sign is +1 and
        h(j) + size (the tensor's bucket count) when it is -1, so one gather/scatter over
        [b, -b] does the signs; int32 slots (int64 past 2**31) make it two to three times
        faster than int64 indices and a separate sign multiply."""
        per_device = self._cache.setdefault(name, {})
        if device not in per_device:
            if per_device:
                cpu = next(iter(per_device.values()))
            else:
                numel, size = math.prod(self.shapes[name]), self.sizes[name]
                gen = generator(self.seed, name, "hash")
                if size >= numel:  # a small tensor: one bucket per entry, sent exactly
                    index, negative = torch.arange(numel), torch.zeros(numel, dtype=torch.int64)
                else:
                    index = torch.randint(0, max(size, 1), (numel,), generator=gen)
                    negative = 1 - torch.randint(0, 2, (numel,), generator=gen)
                count = torch.bincount(index, minlength=size).clamp(min=1).to(torch.float32)
                slot = index + negative * size
                cpu = (slot.to(torch.int32) if 2 * size < 2**31 else slot, count)
            per_device[device] = tuple(t.to(device) for t in cpu)
        return per_device[device]


def round_hash_seed(seed: int, server_round: int) -> int:
    """A round's shared hashing seed: every device of the round hashes its diff the same way,
    so their mean (FedAvg) stays in that round's subspace; the server checks replies use it."""
    return zlib.crc32(f"{seed}:{server_round}".encode())


def hashed_subspace(shapes: Mapping[str, Sequence[int]], buckets: int, seed: int) -> HashedSubspace:
    """The subspace for (shapes, buckets, seed), the last one kept: a device trains and then
    encodes in the same one, and a server decodes a round's replies in one."""
    key = tuple((name, tuple(int(d) for d in shape)) for name, shape in shapes.items())
    return _cached(key, buckets, seed)


@functools.lru_cache(maxsize=1)
def _cached(key: tuple, buckets: int, seed: int) -> HashedSubspace:
    return HashedSubspace(dict(key), buckets, seed)


def split_buckets(numels: Mapping[str, int], buckets: int) -> dict[str, int]:
    """Buckets per tensor. The smallest tensors get one bucket per entry (sent exactly) while
    together they take at most half the buckets: biases and norms always, a new classifier
    head too at higher densities (hashing would tie unrelated units' weights). The others
    share the rest, one each at least, then in proportion to size (largest remainder, ties by
    name, so the split does not depend on dict order)."""
    positive = sum(1 for numel in numels.values() if numel > 0)
    if buckets < positive:
        raise ConfigError(
            f"compression.buckets: {buckets} is fewer than the {positive} tensors of the update"
        )
    if buckets > sum(numels.values()):
        raise ConfigError(
            f"compression.buckets: {buckets} is more than the {sum(numels.values())} entries "
            "of the update"
        )
    exact: dict[str, int] = {}
    for name, numel in sorted(numels.items(), key=lambda item: (item[1], item[0])):
        if numel <= 0:
            continue
        if sum(exact.values()) + numel > buckets // 2:
            break
        exact[name] = numel
    hashed = {name: numel for name, numel in numels.items() if name not in exact}
    spare = buckets - sum(exact.values())
    if exact and any(hashed.values()) and spare >= sum(1 for k in hashed.values() if k > 0):
        return exact | _proportional(hashed, spare)
    return _proportional(numels, buckets)


def _proportional(numels: Mapping[str, int], buckets: int) -> dict[str, int]:
    names = [name for name in numels if numels[name] > 0]
    total = sum(numels[name] for name in names)
    spare = buckets - len(names)
    quotas = {name: spare * numels[name] / total for name in names}
    sizes = {name: 1 + int(quotas[name]) for name in names}
    left = buckets - sum(sizes.values())
    by_remainder = sorted(names, key=lambda name: (-(quotas[name] % 1), name))
    for name in by_remainder[:left]:
        sizes[name] += 1
    return {name: sizes.get(name, 0) for name in numels}
