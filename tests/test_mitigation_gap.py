"""Each fairness mitigation closes a constructed gap.

A population of quadratic devices: device i's loss is (w - c_i)^2 / 2. Eight heavy devices want
w = +1, two light ones want w = -1; a device's local training is one gradient step from the
global model. Plain FedAvg (weighted by examples) settles near the heavy devices' optimum and
fails the light cohort; each mitigation must shrink the gap between the cohorts' losses while
running through the real strategies' configure/aggregate.
"""

from __future__ import annotations

import numpy as np
import pytest
from flower_fakes import FakeGrid, Reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app.message import arrayrecord

from fedtrust.server.finetune import CohortFinetune
from fedtrust.server.qffl import SampledQFedAvg
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.reweighting import AdversarialReweighting
from fedtrust.server.selection import ActivitySelection, UniformSelection
from fedtrust.server.strategy import SampledFedAvg

TARGET = np.array([1.0] * 8 + [-1.0] * 2)
COUNTS = np.array([400.0] * 8 + [5.0] * 2)
LIGHT = COUNTS < 100
STEP = 0.5  # the devices' local learning rate


pytestmark = pytest.mark.usefixtures("run_identity")


def _loss(w: float) -> np.ndarray:
    return (w - TARGET) ** 2 / 2


def _registry() -> DeviceRegistry:
    return DeviceRegistry({d: 100 + d for d in range(len(COUNTS))}, metadata=lambda r: COUNTS)


def _federate(strategy, rounds: int = 60) -> tuple[float, np.ndarray]:
    """Run `rounds` rounds; return the final model and how often each device was chosen."""
    w, chosen_count = 0.0, np.zeros(len(COUNTS))
    for server_round in range(1, rounds + 1):
        record = ArrayRecord({"w": Array(np.asarray([w], dtype=np.float32))})
        messages = list(
            strategy.configure_train(server_round, record, ConfigRecord({}), FakeGrid(10))
        )
        chosen = strategy.last_selection["devices"]
        chosen_count[chosen] += 1
        wants_fisher = bool(messages[0].content["config"].get("fisher", False))
        replies = []
        for d in chosen:
            local = w - STEP * (w - TARGET[d])
            content = {
                "arrays": ArrayRecord({"w": Array(np.asarray([local], dtype=np.float32))}),
                "metrics": MetricRecord(
                    {"num-examples": int(COUNTS[d]), "global_loss": float(_loss(w)[d])}
                ),
                "device": ConfigRecord({"device": int(d), "available": int(COUNTS[d])}),
            }
            if wants_fisher:
                content["fisher"] = ArrayRecord({"w": Array(np.ones(1, dtype=np.float32))})
            replies.append(Reply(RecordDict(content)))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        w = float(arrays["w"].numpy()[0])
    return w, chosen_count


def _gap(w: float) -> float:
    loss = _loss(w)
    return float(loss[LIGHT].mean() - loss[~LIGHT].mean())


def _common(**kwargs):
    return dict(registry=_registry(), devices_per_round=10, seed=0) | kwargs


def test_fedavg_fails_the_light_cohort():
    w, _ = _federate(SampledFedAvg(**_common(selection=UniformSelection())))
    assert w == pytest.approx((400 * 8 - 5 * 2) / (400 * 8 + 5 * 2), abs=1e-3)
    assert _gap(w) > 1.9


def test_q_ffl_closes_the_gap(monkeypatch):
    # Flower's q-FedAvg frees every reply's arrays with a full gc.collect(): seconds per round
    # in a test process full of transformers objects, and nothing this test is about.
    monkeypatch.setattr(arrayrecord.gc, "collect", lambda *args: 0)
    baseline = _gap(_federate(SampledFedAvg(**_common(selection=UniformSelection())))[0])
    q_ffl = SampledQFedAvg(
        **_common(selection=UniformSelection()), q=2.0, client_learning_rate=STEP
    )
    w, _ = _federate(q_ffl)
    assert _gap(w) < 0.6 * baseline
    assert _loss(w)[LIGHT].mean() < _loss(0.998)[LIGHT].mean()  # the light users gain


def test_adversarial_reweighting_closes_the_gap_within_its_bound():
    baseline = _gap(_federate(SampledFedAvg(**_common(selection=UniformSelection())))[0])
    arw = SampledFedAvg(
        **_common(selection=UniformSelection()),
        reweighting=AdversarialReweighting(step=5.0, bound=200.0),
    )
    w, _ = _federate(arw)
    assert _gap(w) < 0.6 * baseline
    bounded = SampledFedAvg(
        **_common(selection=UniformSelection()),
        reweighting=AdversarialReweighting(step=5.0, bound=2.0),
    )
    w_bounded, _ = _federate(bounded)
    # a tighter bound limits how far the adversary moves the model from FedAvg's
    assert _gap(w) < _gap(w_bounded) < baseline


def test_a_selection_floor_reaches_the_light_devices_activity_never_picks():
    plain = SampledFedAvg(**_common(selection=ActivitySelection(1.0), devices_per_round=3))
    _, picked = _federate(plain, rounds=40)
    floor = SampledFedAvg(
        **_common(selection=ActivitySelection(1.0, floor=0.5), devices_per_round=3)
    )
    _, picked_floor = _federate(floor, rounds=40)
    assert picked[LIGHT].sum() <= 1  # ~0.5 % chance per draw
    assert picked_floor[LIGHT].min() >= 2  # ~7.5 % per device and round with the floor


def test_cohort_fine_tuning_up_weights_the_worst_cohort_and_closes_the_gap():
    def light_is_worst(counts: np.ndarray, losses: np.ndarray) -> np.ndarray:
        known = ~np.isnan(losses)
        return known & (losses > np.nanmedian(losses)) | (~known & (counts < 100))

    def run(finetune: CohortFinetune | None) -> float:
        strategy = SampledFedAvg(
            **_common(selection=ActivitySelection(1.0, floor=0.5), devices_per_round=3),
            weighting="equal",
            finetune=finetune,
            total_rounds=40,
        )
        return _gap(_federate(strategy, rounds=40)[0])

    phase = CohortFinetune(rounds=10, upweight=50.0, ewc_lambda=0.0, find_worst=light_is_worst)
    assert run(phase) < 0.8 * run(None)
