"""The simulated population holds O(devices) small arrays; devices not asked cost nothing."""

from __future__ import annotations

import numpy as np
from tiny_runs import tiny_run_config

from fedtrust.simulations.population import STORES_KEPT, build_population


def test_counts_need_no_device_objects_and_agree_with_each_device(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = tiny_run_config(
        tmp_path, tiny_bert, intent_jsonl, "pop",
        "partition.num_devices=150", "partition.scheme=powerlaw", "devices.mode=continual",
        "devices.capacity=3", "devices.eviction=random",
    )  # fmt: skip
    population = build_population(cfg)
    counts = {r: population.counts(r) for r in range(1, 8)}
    assert len(population._stores) == 0  # the server's metadata builds no per-device storage
    for device in range(150):
        for r in range(1, 8):  # what the device itself holds, round after round
            assert (
                len(population.rows(device, r)) == counts[r][device] == population.count(device, r)
            )
    assert len(population._stores) <= STORES_KEPT
    assert (counts[7] <= 3).all() and (counts[7] >= 1).all()
    assert np.array_equal(population.counts(3), counts[3])  # asking again changes nothing
