"""The cost of update compression on a device: one participation of the default run's device,
trained and encoded with each `[compression]` method, against the same training sending dense
weights, measured side by side in one process.

Learned diffs (sparse-diff, hashed-diff) cost per step (their projections) and per pruning
event; top-k and quantisation cost once, at encoding (with error feedback: the residual read
and written). Also timed: the server decoding the reply, and the compressed downlink (the
server's delta of the moved global model, the device rebuilding it and checking its CRC).
Prints each part and the overhead: everything compression adds to a participation, as a share
of the dense one (a simulated round is its participations one after another).

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
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedtrust.clients.downlink import HeldModels
from fedtrust.clients.settings import ClientSettings
from fedtrust.clients.train import train_local
from fedtrust.clients.updates import LearnedDiff, ResidualStore, encode_update, planned_steps
from fedtrust.compression import CompressionSettings, decode, payload_bytes
from fedtrust.compression.lossless import changed_entries, state_crc
from fedtrust.simulations.compression_report import COMPRESSION_VARIANTS
from fedtrust.simulations.config import load_config
from fedtrust.simulations.population import Population, cached_population
from fedtrust.tasks import trainable_state


def participation(
    population: Population,
    client: ClientSettings,
    device: int,
    codec: CompressionSettings | None,
    folder: Path,
) -> dict[str, float]:
    """One participation of `device` under `codec` (None: dense), timed in its parts:
    `device` (train + encode, with the residual read and written), `decode` (the server, one
    reply), `downlink` (the server's delta of a global model that moved by this update, and the
    device rebuilding and checking it), and the payload `bytes`. Each device hashes with its
    own seed, as each round does (the hashed subspace is built once per round and seed)."""
    model = population.task.build_model(0)
    start = {k: v.clone() for k, v in trainable_state(model).items()}
    rows = population.rows(device, 1)
    store = ResidualStore(folder)  # last round's residual: zeros (error feedback reads it)
    store.save(device, 0, {k: torch.zeros_like(v) for k, v in start.items()}, 0)
    began = time.perf_counter()
    steps = planned_steps(len(rows), client.batch_size, client.epochs, client.steps)
    diff = LearnedDiff.start(codec, model, steps, seed=device + 1)
    hooks = {} if diff is None else {"after_step": diff.after_step, "before_step": diff.before_step}
    train_local(model, population.task, rows, client, seed=device, **hooks)
    update = diff.update() if diff is not None else None
    weights = {k: v.clone() for k, v in trainable_state(model).items()}
    if codec is None:
        size = sum(v.numel() * 4 for v in weights.values())
        return {"device": time.perf_counter() - began, "bytes": size, "decode": 0, "downlink": 0}
    update = update or {k: weights[k] - start[k] for k in weights}
    payload = encode_update(update, codec, store, device, 1, device + 1, residual_round=0)
    seconds = {"device": time.perf_counter() - began, "bytes": payload_bytes(payload)}
    began = time.perf_counter()
    decoded = decode(payload, {k: tuple(v.shape) for k, v in update.items()})
    seconds["decode"] = time.perf_counter() - began
    old = {k: v.numpy() for k, v in start.items()}
    new = {k: (start[k] + decoded[k]).numpy() for k in start}
    began = time.perf_counter()
    changes = changed_entries(new, old)
    info = {"base-version": 0, "base-crc": 0, "version": 1, "oldest": 0, "crc": state_crc(new)}
    HeldModels(folder / str(device), old).receive(
        ArrayRecord({k: Array(v) for k, v in changes.items()}), ConfigRecord(info)
    )
    seconds["downlink"] = time.perf_counter() - began
    return seconds


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
    results: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as folder:
        for device in range(args.devices):
            for name, codec in methods.items():  # interleaved: drift hits every method alike
                codec = None if codec.method == "none" else codec
                results[name].append(
                    participation(population, cfg.client, device, codec, Path(folder))
                )
    mean = {
        name: {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
        for name, runs in results.items()
    }
    dense = mean[next(iter(mean))]["device"]
    print(f"dense participation: {dense:.2f} s (train + send the weights)")
    print(
        f"{'method':32s} {'device s':>9s} {'decode s':>9s} {'downlink s':>11s}"
        f" {'overhead':>9s} {'payload MB':>11s}"
    )
    for name, m in mean.items():
        extra = m["device"] + m["decode"] + m["downlink"] - dense
        print(
            f"{name:32s} {m['device']:9.2f} {m['decode']:9.3f} {m['downlink']:11.3f}"
            f" {extra / dense:9.1%} {m['bytes'] / 1e6:11.3f}"
        )


if __name__ == "__main__":
    main()
