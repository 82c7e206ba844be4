"""The simulated population holds O(devices) small arrays; devices not asked cost nothing."""

from __future__ import annotations

from tiny_runs import tiny_run_config

from fedtrust.clients.device_data import DeviceStore
from fedtrust.simulations.population import STORES_KEPT, build_population


def test_counts_need_no_device_objects_and_rows_survive_the_store_cache(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = tiny_run_config(
        tmp_path, tiny_bert, intent_jsonl, "pop",
        "partition.num_devices=150", "partition.scheme=powerlaw", "devices.mode=continual",
        "devices.capacity=4", "devices.eviction=random", "devices.initial_fraction=0.3",
    )  # fmt: skip
    population = build_population(cfg)
    counts = {r: population.counts(r) for r in range(1, 8)}
    assert len(population._stores) == 0  # the server's metadata builds no per-device storage
    arrived = population.schedule.arrived
    for r in range(1, 8):  # round by round over 150 devices: the cache (64) evicts and replays
        for device in range(150):
            fresh = DeviceStore(population.parts[device], cfg.devices, cfg.run.seed, device,
                                lambda t, d=device: int(arrived(t)[d]))  # fmt: skip
            expected = [population.task.train[i] for i in fresh.available(r)]
            assert population.rows(device, r) == expected
            assert len(expected) == counts[r][device] == population.count(device, r)
        assert len(population._stores) <= STORES_KEPT
    assert population.rows(3, 2) == [
        population.task.train[i]
        for i in DeviceStore(
            population.parts[3], cfg.devices, cfg.run.seed, 3, lambda t: int(arrived(t)[3])
        ).available(2)
    ]  # fmt: skip  (asked again for an earlier round: replayed, not cached)
    assert (counts[7] <= 4).all() and (counts[7] >= 1).all() and len(set(counts[7])) > 1
