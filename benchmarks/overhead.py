"""Simulation overhead: a federated round's wall time against the same devices' bare training.

Runs `fedtrust simulate` (Flower + Ray) for a few rounds, then, in this one process and with the
same data, model, settings and torch threads, trains the very devices each round chose, one after
another, with the plain local loop (`fedtrust.clients.train.train_local`): no Flower, no Ray, no
messages, no evaluation. Prints, per round and in total, the round's wall time, its phases as
the round loop measured them (devices = from sending the messages to the last reply; aggregation;
central evaluation) and the ratios round / bare and devices-phase / bare.

    python benchmarks/overhead.py                         # the default run's config, 3 rounds
    python benchmarks/overhead.py --rounds 3 --set selection.devices_per_round=50
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from fedtrust.clients.settings import ClientSettings
from fedtrust.clients.train import train_local
from fedtrust.simulations.config import load_config
from fedtrust.simulations.population import Population, cached_population
from fedtrust.simulations.runner import simulate


def bare_seconds(
    population: Population, client: ClientSettings, devices: list[int], server_round: int
) -> float:
    """Train `devices` one after another in this process, as their ClientApps would."""
    torch.set_num_threads(client.num_cpus)
    model = population.task.build_model(0)
    began = time.perf_counter()
    for device in devices:
        rows = population.rows(device, server_round)
        train_local(model, population.task, rows, client, seed=device)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                f"server.rounds={args.rounds}",
                "cohorts.clusters=0",
                f'run.output_dir="{out}"',
                'run.name="overhead"',
            ],
        )
        run_dir, _ = simulate(cfg)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    population = cached_population(cfg)
    print("| round | devices | round (s) | devices phase (s) | aggregate (s) | evaluate (s) | "
          "bare training (s) | round / bare | devices phase / bare |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    totals = {"round": 0.0, "devices": 0.0, "bare": 0.0}
    for row in rows:
        bare = bare_seconds(population, cfg.client, row["devices"], row["round"])
        phase = row["phases"]
        totals["round"] += row["seconds"]
        totals["devices"] += phase["devices"]
        totals["bare"] += bare
        cells = (
            row["round"], len(row["devices"]), f"{row['seconds']:.1f}", f"{phase['devices']:.1f}",
            f"{phase['aggregate']:.2f}", f"{phase['evaluate']:.1f}", f"{bare:.1f}",
            f"{row['seconds'] / bare:.2f}", f"{phase['devices'] / bare:.2f}",
        )  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(
        f"\ntotal: round / bare = {totals['round'] / totals['bare']:.3f}, "
        f"devices phase / bare = {totals['devices'] / totals['bare']:.3f} "
        f"({len(rows)} rounds; bare = the same devices trained in one process, no Flower/Ray)"
    )


if __name__ == "__main__":
    main()
