"""The cost of update compression on a device: one participation of the default run's device,
trained and encoded with each `[compression]` method, against the same training sending dense
weights, measured side by side in one process.

Learned diffs (sparse-diff, hashed-diff) cost per step (their projections) and per pruning
event; top-k and quantisation cost once, at encoding (with error feedback: the residual read
and written). Prints seconds per participation, the ratio to dense, the payload size and the
server's decoding time per reply.

    python benchmarks/compression.py                  # the default run's model and a device
    python benchmarks/compression.py --devices 3      # the mean over 3 devices
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from fedtrust.clients.train import train_local
from fedtrust.clients.updates import LearnedDiff, ResidualStore, encode_update, planned_steps
from fedtrust.compression import CompressionSettings, decode, payload_bytes
from fedtrust.simulations.compression_report import COMPRESSION_VARIANTS
from fedtrust.simulations.config import load_config
from fedtrust.simulations.population import cached_population
from fedtrust.tasks import trainable_state


def participation(population, client, device: int, codec, folder: Path) -> tuple[float, int, float]:
    """Seconds to train `device` once and encode its update; the payload's bytes; seconds the
    server takes to decode it. Each device hashes with its own seed, as each round does (the
    hashed subspace is built once per round and seed)."""
    model = population.task.build_model(0)
    start = {k: v.clone() for k, v in trainable_state(model).items()}
    rows = population.rows(device, 1)
    began = time.perf_counter()
    steps = planned_steps(len(rows), client.batch_size, client.epochs, client.steps)
    diff = LearnedDiff.start(codec, model, steps, seed=device + 1)
    hooks = {} if diff is None else {"after_step": diff.after_step, "before_step": diff.before_step}
    train_local(model, population.task, rows, client, seed=device, **hooks)
    update = diff.update() if diff is not None else None
    weights = {k: v.clone() for k, v in trainable_state(model).items()}
    if codec is None:
        return time.perf_counter() - began, sum(v.numel() * 4 for v in weights.values()), 0.0
    update = update or {k: weights[k] - start[k] for k in weights}
    store = ResidualStore(folder)
    store.save(device, 0, {k: torch.zeros_like(v) for k, v in update.items()}, 0)
    payload = encode_update(update, codec, store, device, 1, device + 1, residual_round=0)
    seconds = time.perf_counter() - began
    began = time.perf_counter()
    decode(payload, {k: tuple(v.shape) for k, v in update.items()})
    return seconds, payload_bytes(payload), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, args.overrides)
    torch.set_num_threads(cfg.client.num_cpus)
    population = cached_population(cfg)
    methods = {
        name: CompressionSettings(**v["compression"]) for name, v in COMPRESSION_VARIANTS.items()
    }
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as folder:
        for device in range(args.devices):
            for name, codec in methods.items():  # interleaved: drift hits every method alike
                codec = None if codec.method == "none" else codec
                results[name].append(
                    participation(population, cfg.client, device, codec, Path(folder))
                )
    dense = sum(run[0] for run in results[next(iter(results))]) / args.devices
    print(
        f"{'method':34s} {'s / participation':>18s} {'vs dense':>9s} {'payload MB':>11s}"
        f" {'server decode s':>16s}"
    )
    for name, runs in results.items():
        seconds, size, decoding = (sum(column) / len(runs) for column in zip(*runs))
        print(
            f"{name:34s} {seconds:18.2f} {seconds / dense:9.3f} {size / 1e6:11.3f} {decoding:16.3f}"
        )


if __name__ == "__main__":
    main()
