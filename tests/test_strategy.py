"""The strategy mixin's aggregation on hand-made replies (no network)."""

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
from flower_fakes import FakeGrid, Reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.replies import TooFewReplies
from fedtrust.server.selection import UniformSelection
from fedtrust.simulations.config import load_config
from fedtrust.simulations.federation import make_strategy


def _reply(device, value, n):
    return Reply(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
                "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
                "device": ConfigRecord({"device": device, "available": n}),
            }
        )
    )


pytestmark = pytest.mark.usefixtures("run_identity")


def _strategy(weighting, counts):
    cfg = load_config(
        None,
        [
            "partition.num_devices=4",
            "selection.devices_per_round=2",
            f"selection.weighting={weighting}",
        ],
    )
    registry = DeviceRegistry({d: 100 + d for d in range(4)}, metadata=lambda r: counts)
    strategy = make_strategy(cfg, registry, 4)
    glob = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    messages = list(strategy.configure_train(1, glob, ConfigRecord({}), FakeGrid()))
    chosen = strategy.last_selection["devices"]
    assert sorted(m.metadata.dst_node_id for m in messages) == [100 + d for d in chosen]
    return strategy, chosen


def test_example_weighted_fedavg():
    counts = np.array([10, 30, 20, 40])
    strategy, chosen = _strategy("examples", counts)
    replies = [_reply(d, float(d + 1), int(counts[d])) for d in chosen]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = sum(counts[d] * (d + 1) for d in chosen) / sum(counts[d] for d in chosen)
    assert np.allclose(arrays["w"].numpy(), expected)


def test_unbiased_weighting_scales_the_step_by_inclusion_probability():
    counts = np.array([10, 30, 20, 40])
    strategy, chosen = _strategy("unbiased", counts)
    replies = [_reply(d, float(d + 1), int(counts[d])) for d in chosen]
    arrays, _ = strategy.aggregate_train(1, replies)
    # global is 0, pi = 2/4: update = sum_i n_i / (n * pi) * delta_i
    expected = sum(counts[d] / (counts.sum() * 0.5) * (d + 1) for d in chosen)
    assert np.allclose(arrays["w"].numpy(), expected, rtol=1e-6)


def test_a_round_where_every_device_fails_is_a_clear_error():
    strategy, chosen = _strategy("examples", np.array([1, 1, 1, 1]))

    @dataclass
    class Err:
        reason: str = "Traceback ...\nValueError: out of memory"

    failed = Reply(RecordDict(), error=Err(), metadata=SimpleNamespace(src_node_id=100 + chosen[0]))
    reason = f"device {chosen[0]}: raised: ValueError: out of memory"
    with pytest.raises(TooFewReplies, match=reason):
        strategy.aggregate_train(1, [failed])


def test_non_private_selection_is_gumbel_top_k_seeded_by_run_seed_and_round():
    counts = np.array([10, 30, 20, 40])
    for server_round in (1, 2, 3):
        strategy, _ = _strategy("examples", counts)
        glob = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
        list(strategy.configure_train(server_round, glob, ConfigRecord({}), FakeGrid()))
        expected = UniformSelection().draw(counts, 2, np.random.default_rng([0, server_round]))
        assert strategy.last_selection["devices"] == expected.tolist()


def test_devices_get_no_accountant_history_from_the_server():
    """Sample-level DP: each device keeps its own budget; the message carries only the config."""
    cfg = load_config(
        None,
        [
            "partition.num_devices=4",
            "selection.devices_per_round=2",
            "privacy.target_epsilon=4.0",
        ],
    )
    registry = DeviceRegistry(
        {d: 100 + d for d in range(4)}, metadata=lambda r: np.array([5, 5, 5, 5])
    )
    strategy = make_strategy(cfg, registry, 4)
    glob = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    messages = list(strategy.configure_train(1, glob, ConfigRecord({"x": 1}), FakeGrid()))
    assert messages
    for msg in messages:
        assert set(msg.content["config"].keys()) == {"x", "server-round"}
