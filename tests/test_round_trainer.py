"""The round loop's handling of late, crashing and busy devices, on a grid with a clock."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
from flower_fakes import Reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtrust.errors import FederationError
from fedtrust.server.federation import RoundTrainer
from fedtrust.server.registry import DeviceRegistry
from fedtrust.simulations.config import load_config
from fedtrust.simulations.federation import make_strategy

pytestmark = pytest.mark.usefixtures("run_identity")


@dataclass
class _Err:
    reason: str


class ClockGrid:
    """Nodes 100.. answer with global + 1 (or raise) at the first pull; a device in `polls`
    answers its first message only at that many pulls."""

    def __init__(self, n: int, polls: dict[int, int], crash: set[int] = frozenset()) -> None:
        self.n, self.polls, self.crash = n, polls, crash
        self.waiting: dict[str, list] = {}  # message id -> [message, pulls left]
        self.delivered: list[int] = []  # devices whose replies were pulled, in order

    def get_node_ids(self) -> list[int]:
        return [100 + d for d in range(self.n)]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"m{len(self.waiting) + len(self.delivered)}-{msg.metadata.dst_node_id}"
            self.waiting[mid] = [msg, self.polls.pop(msg.metadata.dst_node_id - 100, 1)]
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            if mid not in self.waiting:
                continue
            entry = self.waiting[mid]
            entry[1] -= 1
            if entry[1] > 0:
                continue
            msg = self.waiting.pop(mid)[0]
            device = msg.metadata.dst_node_id - 100
            meta = SimpleNamespace(src_node_id=100 + device, reply_to_message_id=mid)
            self.delivered.append(device)
            if device in self.crash:
                out.append(Reply(RecordDict(), error=_Err("RuntimeError: boom"), metadata=meta))
                continue
            weights = msg.content["arrays"]["w"].numpy() + 1
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(weights)}),
                    "metrics": MetricRecord({"num-examples": 5}),
                    "device": ConfigRecord({"device": device, "available": 5}),
                }
            )
            out.append(Reply(content, metadata=meta))
        return out


def _trainer(grid, n, k, *settings, timeout=0.35):
    cfg = load_config(None, [f"partition.num_devices={n}", f"selection.devices_per_round={k}",
                             *settings])  # fmt: skip
    registry = DeviceRegistry({d: 100 + d for d in range(n)}, metadata=lambda r: np.full(n, 5))
    strategy = make_strategy(cfg, registry, n)
    return RoundTrainer(grid, strategy, ConfigRecord({}), [], timeout, cfg.server.retries)


GLOBAL = ArrayRecord({"w": Array(np.zeros(3, np.float32))})


def test_a_late_device_is_dropped_then_kept_busy_until_its_late_reply_is_thrown_away():
    grid = ClockGrid(4, polls={0: 7})  # device 0 answers at the 7th pull; 3-5 fit in 0.35 s
    trainer = _trainer(grid, 4, 4)
    phases = {"devices": 0.0, "aggregate": 0.0}
    arrays, _, failures = trainer.train(1, GLOBAL, phases)
    assert [(f.device, f.reason) for f in failures] == [
        (0, "no reply within server.round_timeout = 0.35 s")
    ]
    assert np.allclose(arrays["w"].numpy(), 1.0)  # the three that replied, each global + 1
    assert phases["devices"] >= 0.35
    arrays, _, failures = trainer.train(2, arrays, phases)  # device 0 still busy: not asked
    assert failures == [] and 0 not in trainer.strategy.last_selection["devices"]
    for server_round in range(3, 8):  # its late reply arrives and is discarded; then it is back
        arrays, _, failures = trainer.train(server_round, arrays, phases)
        assert failures == []
    assert 0 in trainer.strategy.last_selection["devices"]
    assert np.allclose(arrays["w"].numpy(), 7.0)  # seven rounds of +1: the late reply never counted
    assert grid.delivered.count(0) >= 2 and not trainer.abandoned


def test_a_retry_selects_afresh_without_the_devices_that_just_failed():
    grid = ClockGrid(6, polls={}, crash={0, 1, 2, 3})
    trainer = _trainer(grid, 6, 2, "server.min_replies=2", "server.retries=3")
    arrays, _, failures = trainer.train(1, GLOBAL, {"devices": 0.0, "aggregate": 0.0})
    asked = [f.device for f in failures]
    assert len(asked) == len(set(asked))  # no crashed device was asked twice
    assert sorted(trainer.strategy.last_selection["devices"]) == [4, 5]
    assert np.allclose(arrays["w"].numpy(), 1.0)


def test_a_round_with_too_few_replies_in_every_attempt_is_skipped_or_stops_the_run():
    grid = ClockGrid(6, polls={}, crash={0, 1, 2, 3, 4})
    trainer = _trainer(grid, 6, 2, "server.min_replies=2", "server.retries=1")
    arrays, _, failures = trainer.train(1, GLOBAL, {"devices": 0.0, "aggregate": 0.0})
    assert arrays is None and len(failures) >= 3  # some usable replies, never two: skipped
    dead = _trainer(ClockGrid(4, polls={}, crash={0, 1, 2, 3}), 4, 2, "server.retries=1")
    with pytest.raises(FederationError, match="no usable reply in any attempt: device"):
        dead.train(1, GLOBAL, {"devices": 0.0, "aggregate": 0.0})


def test_user_level_dp_never_retries_and_stops_when_every_device_raises():
    # seeded sampling: with OS entropy, 1 run in 9 sampled only crashed devices
    private = (
        "privacy.level=user",
        "privacy.noise_multiplier=1.0",
        "server.retries=3",
        "privacy.reproducible_noise=true",
    )
    some = _trainer(ClockGrid(6, polls={}, crash={0, 1, 2}), 6, 3, *private)
    arrays, _, failures = some.train(1, GLOBAL, {"devices": 0.0, "aggregate": 0.0})
    assert arrays is not None and some.strategy.attempt == 0  # released, no second sample
    assert {f.reason for f in failures} <= {"raised: RuntimeError: boom"}
    dead = _trainer(ClockGrid(6, polls={}, crash=set(range(6))), 6, 3, *private)
    with pytest.raises(FederationError, match="round 1: every device failed: device"):
        dead.train(1, GLOBAL, {"devices": 0.0, "aggregate": 0.0})
