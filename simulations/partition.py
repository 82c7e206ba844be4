"""Split a training set into devices, deterministically by seed.

Each partitioner returns one array of example indices per device. Devices never share examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedtrust.errors import ConfigError


class PartitionError(ConfigError):
    """The data cannot be split as asked."""


def natural(
    devices: Sequence[str | None], min_examples: int = 1
) -> tuple[list[np.ndarray], list[str]]:
    """One device per value of the data's own user column (e.g. a speaking role)."""
    if any(d is None for d in devices):
        raise PartitionError("natural partition needs a device column on every training example")
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(devices):
        groups.setdefault(str(d), []).append(i)
    names = sorted(n for n, idx in groups.items() if len(idx) >= min_examples)
    if not names:
        raise PartitionError(f"no device has at least {min_examples} examples")
    return [np.asarray(groups[n]) for n in names], names


def iid(num_examples: int, num_devices: int, seed: int) -> list[np.ndarray]:
    """Shuffle, then deal out equal shares."""
    _check_sizes(num_examples, num_devices)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_devices)]


def dirichlet(labels: Sequence[int], num_devices: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: each class is spread over devices with proportions ~ Dirichlet(alpha).

    Every device is guaranteed at least one example (examples are moved from the largest device).
    """
    labels = np.asarray(labels)
    _check_sizes(len(labels), num_devices)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for device, chunk in enumerate(np.split(idx, cuts)):
            parts[device].extend(chunk.tolist())
    _fill_empty(parts)
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]


def powerlaw(num_examples: int, num_devices: int, exponent: float, seed: int) -> list[np.ndarray]:
    """Quantity skew: device sizes ~ 1 + Pareto(exponent); a smaller exponent is a heavier tail."""
    _check_sizes(num_examples, num_devices)
    rng = np.random.default_rng(seed)
    weights = rng.pareto(exponent, size=num_devices) + 1.0
    sizes = 1 + np.floor(weights / weights.sum() * (num_examples - num_devices)).astype(int)
    sizes[np.argmax(sizes)] += num_examples - sizes.sum()  # rounding remainder
    order = rng.permutation(num_examples)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def _check_sizes(num_examples: int, num_devices: int) -> None:
    if num_devices > num_examples:
        raise PartitionError(
            f"partition.num_devices = {num_devices} is more than the {num_examples} training "
            "examples: every device needs at least one"
        )


def _fill_empty(parts: list[list[int]]) -> None:
    for part in parts:
        if not part:
            donor = max(parts, key=len)
            part.append(donor.pop())


def partition(cfg, labels: Sequence[int] | None, devices: Sequence[str | None], seed: int):
    """Dispatch on `cfg.scheme` (a PartitionConfig); returns (index arrays, device names)."""
    n = len(devices)
    if cfg.scheme == "natural":
        return natural(devices, cfg.min_examples)
    if cfg.scheme == "iid":
        parts = iid(n, cfg.num_devices, seed)
    elif cfg.scheme == "dirichlet":
        if labels is None:
            raise PartitionError("dirichlet partition needs labels (use iid or powerlaw for lm)")
        parts = dirichlet(labels, cfg.num_devices, cfg.alpha, seed)
    else:
        parts = powerlaw(n, cfg.num_devices, cfg.exponent, seed)
    return parts, [f"device-{i}" for i in range(len(parts))]
