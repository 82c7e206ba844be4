"""What a device sends back: its update as `[compression]` encodes it (`fedtrust.compression`).

The update is the trained weights minus the received ones. With a learned diff (sparse-diff,
hashed-diff) it was trained as the update: `LearnedDiff.start` gives the projections to run
around every optimizer step. With top-k or quantisation the part not sent (the error-feedback
residual) stays on the device for its next participation, in its persistent storage, one file
per round it was made in. The server says which round's residual to carry on from: the last
round whose reply from this device it aggregated (a reply it dropped, or never got, sent
nothing; a round run again after a crash does not see the residual of its first try), so a
resumed run sends exactly what an uninterrupted one would.

Under DP every step of this is post-processing of what DP-SGD released (the projection and the
compression read the noised iterates only): the device's ε does not change.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedtrust.compression import (
    CompressionSettings,
    Payload,
    compress_with_feedback,
    make_diff,
)

RESIDUALS = "residuals"


def planned_steps(rows: int, batch_size: int, epochs: int, steps: int) -> int:
    """Local steps a participation takes (the sparse diff's pruning schedule runs over them)."""
    return steps or epochs * math.ceil(rows / max(min(batch_size, rows), 1))


class LearnedDiff:
    """The learned diff (sparse or hashed) being trained on a model: `before_step` turns the
    gradients into the diff's own (hashed: the buckets'), `after_step` keeps the trainable
    weights on base + diff after each optimizer step (sparse: the mask; hashed: a projection
    only under weight decay); `update()` is the diff."""

    def __init__(
        self,
        settings: CompressionSettings,
        model: nn.Module,
        total_steps: int,
        seed: int,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        base = {n: p.detach().clone() for n, p in self.params.items()}
        self.diff = make_diff(settings, base, total_steps, seed, weight_decay)

    @classmethod
    def start(
        cls,
        settings: CompressionSettings | None,
        model: nn.Module,
        total_steps: int,
        seed: int,
        weight_decay: float = 0.0,
    ) -> LearnedDiff | None:
        if settings is None or settings.method not in ("sparse-diff", "hashed-diff"):
            return None
        return cls(settings, model, total_steps, seed, weight_decay)

    def before_step(self) -> None:
        if hasattr(self.diff, "before_step"):
            self.diff.before_step(self.params)

    def after_step(self, steps_done: int) -> None:
        self.diff.after_step(self.params, steps_done)

    def update(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.diff.finish(self.params).items()}


class ResidualStore:
    """Each device's error-feedback residual, one file per (device, round) under `folder`, in
    a subfolder per `run` (the run folder's name, which a moved or resumed run keeps: a real
    device's storage outlives runs, and two runs sharing it must not mix residuals)."""

    def __init__(self, folder: Path, run: str = "") -> None:
        self.folder = Path(folder) / RESIDUALS / f"run-{zlib.crc32(run.encode()):08x}"

    def _files(self, device: int) -> dict[int, Path]:
        folder = self.folder / str(device)
        if not folder.is_dir():
            return {}
        return {int(p.stem): p for p in folder.glob("*.safetensors") if p.stem.isdigit()}

    def load(self, device: int, made_in: int) -> dict[str, torch.Tensor] | None:
        """The residual the device made in round `made_in` (None: none, or `made_in` < 0)."""
        path = self._files(device).get(made_in)
        return None if path is None else load_file(path)

    def save(
        self, device: int, server_round: int, residual: dict[str, torch.Tensor], made_from: int
    ) -> None:
        """Keep `server_round`'s residual (atomically); residuals older than `made_from` (the
        one this round carried on from) can never be asked for again."""
        folder = self.folder / str(device)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{server_round}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in residual.items()}, tmp)
        os.replace(tmp, folder / f"{server_round}.safetensors")
        for r, path in self._files(device).items():
            if r < made_from:
                path.unlink(missing_ok=True)


def encode_update(
    update: dict[str, torch.Tensor],
    settings: CompressionSettings,
    store: ResidualStore,
    device: int,
    server_round: int,
    seed: int,
    residual_round: int = -1,
    rounding_seed: int | None = None,
) -> Payload:
    """The wire payload of `update` (CPU tensors), carrying on from the residual made in
    `residual_round` (the server's word); keeps this round's residual. `seed` and
    `rounding_seed` as in `fedtrust.compression.encode`."""
    residual = store.load(device, residual_round)
    payload, residual = compress_with_feedback(update, residual, settings, seed, rounding_seed)
    if residual:
        store.save(device, server_round, residual, residual_round)
    return payload
