"""Batches for DP-SGD: Poisson sampling, empty batches, and physical micro-batches.

Poisson sampling reuses Opacus's ``UniformWithReplacementSampler`` (each sample joins a batch
independently with probability q, as the accountant assumes). The loader that the engine
returns is a torch ``DataLoader`` drawing the same logical batches as the one it was given; it
splits a logical batch into micro-batches of at most ``max_physical_batch_size`` rows (the
optimizer only steps after the last one) and turns an empty logical batch into a noise-only
optimizer step, so the training loop never sees an empty batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate

from .noise import fresh_generator
from .optimizer import DPOptimizer


class _EmptySafeCollate:
    """The user's collate function, except that an empty list of rows collates to ``[]``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, rows: list[Any]) -> Any:
        return self.collate_fn(rows) if rows else []


def poisson_loader(data_loader: DataLoader, generator: torch.Generator | None = None) -> DataLoader:
    """A loader over the same dataset drawing Poisson batches with q = 1 / len(data_loader).

    Batches are drawn with `generator` if given, else with a generator seeded from OS entropy:
    never with the user loader's own generator, since whoever knows which samples were in a
    batch removes the amplification by subsampling that the accountant counts on.
    """
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("Poisson sampling needs a map-style dataset, not an IterableDataset")
    sampler = UniformWithReplacementSampler(
        num_samples=len(data_loader.dataset),  # type: ignore[arg-type]
        sample_rate=1 / len(data_loader),
        generator=generator if generator is not None else fresh_generator(),
    )
    return DataLoader(
        data_loader.dataset,
        batch_sampler=sampler,
        collate_fn=_EmptySafeCollate(data_loader.collate_fn),
        **_worker_options(data_loader),
    )


def _worker_options(loader: DataLoader) -> dict[str, Any]:
    """How `loader` loads (workers, pinning, timeouts), whichever rows make up its batches."""
    return {
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": loader.in_order,
    }


def _same_batches(loader: DataLoader) -> dict[str, Any]:
    """DataLoader arguments that draw `loader`'s batches: its own sampler objects, collate
    function and generator (so the random draws are the ones `loader` would make)."""
    if isinstance(loader.dataset, IterableDataset):
        batching: dict[str, Any] = {"batch_size": loader.batch_size, "drop_last": loader.drop_last}
    elif loader.batch_sampler is not None:
        batching = {"batch_sampler": loader.batch_sampler}
    else:  # batch_size=None: no automatic batching
        batching = {"batch_size": None, "sampler": loader.sampler}
    return {
        **batching,
        "collate_fn": loader.collate_fn,
        "generator": loader.generator,
        **_worker_options(loader),
    }


def batch_size_of(batch: Any) -> int:
    """Rows in a batch: the leading size of its first tensor (0 for an empty batch)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, list | tuple):
        values = list(batch)
    else:
        raise TypeError(f"cannot find the batch size of a {type(batch).__name__} batch")
    if not values:
        return 0
    for v in values:
        try:
            return batch_size_of(v)
        except TypeError:
            continue
    raise TypeError("cannot find the batch size of a batch without tensors")


def split_batch(batch: Any, size: int) -> list[Any]:
    """Split every batch-first tensor of `batch` (dict / list / tuple, nested) into chunks."""
    n = batch_size_of(batch)
    starts = range(0, n, size)

    def cut(x: Any, s: int) -> Any:
        if isinstance(x, Tensor):
            return x[s : s + size] if x.dim() and x.shape[0] == n else x
        if isinstance(x, Mapping):
            return {k: cut(v, s) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(cut(v, s) for v in x)
        return x

    return [cut(batch, s) for s in starts]


class DPDataLoader(DataLoader):
    """A torch `DataLoader` drawing the logical (Poisson) batches of `loader`: it yields their
    micro-batches and drives the optimizer's skips and noise-only steps.

    `len()` is the number of logical batches per epoch (micro-batches are not counted);
    `dataset`, `batch_sampler`, `collate_fn` and the worker settings are `loader`'s.
    """

    def __init__(
        self,
        loader: DataLoader,
        optimizer: DPOptimizer,
        max_physical_batch_size: int | None,
        sample_rate: float,
    ) -> None:
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        super().__init__(loader.dataset, **_same_batches(loader))
        self.optimizer = optimizer
        self.max_physical_batch_size = max_physical_batch_size
        self.sample_rate = sample_rate

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.optimizer.begin_logical_batch()
            n = batch_size_of(batch)
            if n == 0:
                self.optimizer.noise_only_step()
                continue
            limit = self.max_physical_batch_size
            chunks = [batch] if limit is None or n <= limit else split_batch(batch, limit)
            for k, chunk in enumerate(chunks):
                self.optimizer.signal_skip_step(k < len(chunks) - 1)
                yield chunk
