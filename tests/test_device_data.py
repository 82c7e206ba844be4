import math

import numpy as np

from fedtrust.clients.device_data import ArrivalSchedule, DeviceStore, StorageSettings

STREAM = np.arange(1000, 1200)


def _cfg(**kw):
    return StorageSettings(
        **({"mode": "continual", "initial_fraction": 0.1, "arrival_rate": 0.05} | kw)
    )


def test_static_holds_everything_every_round():
    store = DeviceStore(STREAM, StorageSettings(mode="static"), seed=0, device=3)
    assert store.count(1) == 200 and store.count(7) == 200
    assert np.array_equal(np.sort(store.available(9)), STREAM)


def test_continual_arrivals_grow_until_the_stream_runs_dry():
    store = DeviceStore(STREAM, _cfg(), seed=0, device=3)
    counts = [store.count(r) for r in range(1, 80)]
    assert counts[0] == math.ceil(0.1 * 200)
    assert all(b >= a for a, b in zip(counts, counts[1:]))
    assert counts[5] > counts[0]
    assert counts[-1] == 200
    assert set(store.available(79)) == set(STREAM)


def test_capacity_fifo_keeps_the_newest():
    store = DeviceStore(STREAM, _cfg(capacity=30, eviction="fifo"), seed=0, device=1)
    for r in range(1, 15):
        assert store.count(r) <= 30
    kept = list(store.stored)
    assert kept == list(range(store.arrived - 30, store.arrived))


def test_capacity_random_eviction_is_a_subset_of_arrivals():
    store = DeviceStore(STREAM, _cfg(capacity=30, eviction="random"), seed=0, device=1)
    store.advance_to(14)
    assert store.count(14) == 30
    assert set(store.stored) <= set(range(store.arrived))
    assert list(store.stored) != list(range(store.arrived - 30, store.arrived))


def test_replay_equals_incremental_and_depends_on_seed_and_device():
    incremental = DeviceStore(STREAM, _cfg(capacity=25, eviction="random"), seed=4, device=2)
    for r in range(1, 12):
        inc = incremental.available(r)
        assert np.array_equal(inc, DeviceStore(STREAM, incremental.settings, 4, 2).available(r))
    other = DeviceStore(STREAM, incremental.settings, 4, 3).available(11)
    assert not np.array_equal(inc, other)


def test_the_population_schedule_agrees_with_every_device_store():
    """The server's vector of counts and each device's own storage see the same arrivals."""
    sizes = np.array([200, 5, 1, 60, 200, 33])
    settings = _cfg(capacity=40, eviction="random")
    schedule = ArrivalSchedule(sizes, settings, [9])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    stores = [
        DeviceStore(
            np.arange(starts[d], starts[d + 1]),
            settings,
            9,
            d,
            lambda r, d=d: int(schedule.arrived(r)[d]),
        )  # fmt: skip
        for d in range(len(sizes))
    ]
    for r in range(1, 30):
        counts = schedule.counts(r)
        assert counts.tolist() == [s.count(r) for s in stores]
        assert (counts <= 40).all() and (schedule.arrived(r) <= sizes).all()
    assert schedule.arrived(29).tolist() == sizes.tolist()  # every stream ran dry
    assert ArrivalSchedule(sizes, settings, [9]).counts(7).tolist() == schedule.counts(7).tolist()
    assert ArrivalSchedule(sizes, settings, [8]).counts(7).tolist() != schedule.counts(7).tolist()


def test_static_schedule_is_the_stream_lengths():
    sizes = np.array([3, 1, 4])
    schedule = ArrivalSchedule(sizes, StorageSettings(mode="static", capacity=2), [0])
    assert schedule.counts(5).tolist() == [3, 1, 4]
