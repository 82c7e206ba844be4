"""Loss-aware mitigations: the devices' loss at the global model, q-FFL, adversarial reweighting.

Server side on hand-made replies (as tests/test_strategy.py); device side through the ClientApp
with a tiny character LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from flower_fakes import FakeGrid, Reply
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedtrust.clients.app import make_client_app
from fedtrust.clients.settings import ClientSettings, DeviceDP, TrainInstructions
from fedtrust.errors import FederationError
from fedtrust.server.qffl import SampledQFedAvg
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.reweighting import AdversarialReweighting
from fedtrust.server.selection import UniformSelection
from fedtrust.server.strategy import SampledFedAvg
from fedtrust.server.user_dp import DPFedAvg
from fedtrust.tasks import trainable_state
from fedtrust.tasks.lm import CharLMTask

pytestmark = pytest.mark.usefixtures("run_identity")


# ---------------------------------------------------------------- server side, hand-made replies


def _reply(device: int, value: np.ndarray, n: int, loss: float | None) -> Reply:
    metrics: dict[str, Any] = {"num-examples": n, "train_loss": 1.0}
    if loss is not None:
        metrics["global_loss"] = loss
    return Reply(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.asarray(value, dtype=np.float32))}),
                "metrics": MetricRecord(metrics),
                "device": ConfigRecord({"device": device, "available": n}),
            }
        )
    )


def _registry(counts: np.ndarray) -> DeviceRegistry:
    return DeviceRegistry({d: 100 + d for d in range(len(counts))}, metadata=lambda r: counts)


def _round(strategy, glob: np.ndarray, models: dict, losses: dict, counts: np.ndarray):
    """One round: configure (so Flower's strategy sees the global model), then aggregate."""
    record = ArrayRecord({"w": Array(np.asarray(glob, dtype=np.float32))})
    messages = list(strategy.configure_train(1, record, ConfigRecord({}), FakeGrid(len(counts))))
    chosen = strategy.last_selection["devices"]
    assert len(messages) == len(chosen)
    replies = [_reply(d, models[d], int(counts[d]), losses.get(d)) for d in chosen]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy().astype(np.float64), metrics


GLOBAL = np.array([1.0, -1.0, 0.5])
# local models a few small steps away from the global one (q-FedAvg's regime: the norm term of
# h_k is then small next to L * F_k^q)
OFFSETS = {0: [1.0, 1.0, -0.5], 1: [-1.0, 2.0, 0.5], 2: [0.0, 4.0, -2.5]}
MODELS = {d: GLOBAL + 0.02 * np.array(o) for d, o in OFFSETS.items()}
LOSSES = {0: 0.5, 1: 1.0, 2: 3.0}  # device 2 is served worst by the global model
COUNTS = np.array([10, 30, 20])


def _qffl_by_hand(q: float, lr: float) -> np.ndarray:
    """q-FedAvg (Li et al. 2020, Algorithm 2) written out: L = 1/lr,
    Delta_k = F_k^q * L (w - w_k),  h_k = q F_k^(q-1) ||L (w - w_k)||^2 + L F_k^q,
    w' = w - sum_k Delta_k / sum_k h_k."""
    lip = 1 / lr
    deltas, hs = [], []
    for d, w_k in MODELS.items():
        grad = lip * (GLOBAL - w_k)
        loss = LOSSES[d]
        deltas.append(loss**q * grad)
        hs.append(q * loss ** (q - 1) * np.sum(grad**2) + lip * loss**q)
    return GLOBAL - np.sum(deltas, axis=0) / np.sum(hs)


def _qffl(q: float, lr: float = 0.1) -> np.ndarray:
    strategy = SampledQFedAvg(
        registry=_registry(COUNTS),
        selection=UniformSelection(),
        devices_per_round=3,
        q=q,
        client_learning_rate=lr,
        total_rounds=5,
    )
    arrays, _ = _round(strategy, GLOBAL, MODELS, LOSSES, COUNTS)
    return arrays


def test_qffl_with_q_zero_is_the_equal_weight_mean_and_matches_the_formula():
    new = _qffl(q=0.0)
    assert np.allclose(new, _qffl_by_hand(0.0, 0.1), atol=1e-5)
    assert np.allclose(new, np.mean(list(MODELS.values()), axis=0), atol=1e-5)


@pytest.mark.parametrize("q", [0.5, 2.0])
def test_qffl_matches_the_formula_and_favours_the_high_loss_device(q):
    new = _qffl(q)
    assert np.allclose(new, _qffl_by_hand(q, 0.1), atol=1e-5)
    worst = MODELS[2]
    assert np.linalg.norm(new - worst) < np.linalg.norm(_qffl(0.0) - worst)


def test_qffl_reads_the_loss_at_the_global_model_and_refuses_user_dp():
    strategy = SampledQFedAvg(
        registry=_registry(COUNTS), selection=UniformSelection(), devices_per_round=3,
        client_learning_rate=0.1,
    )  # fmt: skip
    assert strategy.train_loss_key == "global_loss" and strategy.q == 0.1
    dp = DPFedAvg.create(num_devices=3, devices_per_round=2, clip=1.0, rounds=2,
                         noise_multiplier=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="user-level DP"):
        SampledQFedAvg(registry=_registry(COUNTS), selection=UniformSelection(),
                       devices_per_round=2, client_learning_rate=0.1, user_dp=dp)  # fmt: skip


def test_adversary_is_bounded_monotone_and_neutral_on_equal_losses():
    arw = AdversarialReweighting(step=2.0, bound=3.0)
    losses = np.array([0.1, 0.5, 0.9, 5.0, 40.0])
    lam = arw.multipliers(losses)
    assert np.all(lam >= 1 / 3 - 1e-12) and np.all(lam <= 3 + 1e-12)
    assert np.all(np.diff(lam) >= 0) and lam[-1] == pytest.approx(3.0)
    assert lam.max() / lam.min() <= 9 + 1e-9
    base = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    assert np.allclose(arw.weights(base, np.full(5, 0.7)), base)
    # inside the box it is exactly exp(step * (loss - mean))
    small = np.array([1.0, 1.2, 1.4])
    assert np.allclose(arw.multipliers(small), np.exp(2.0 * (small - small.mean())))
    # a device without a loss (NaN) keeps its weight and is left out of the mean
    with_nan = arw.multipliers(np.array([1.0, np.nan, 1.4]))
    assert np.allclose(with_nan, [np.exp(-0.4), 1, np.exp(0.4)])
    with pytest.raises(ValueError):
        AdversarialReweighting(bound=0.5)


def test_reweighted_aggregate_is_the_hand_weighted_average():
    step, bound = 1.5, 2.0
    strategy = SampledFedAvg(
        registry=_registry(COUNTS),
        selection=UniformSelection(),
        devices_per_round=3,
        reweighting=AdversarialReweighting(step, bound),
    )
    new, _ = _round(strategy, GLOBAL, MODELS, LOSSES, COUNTS)
    losses = np.array([LOSSES[d] for d in range(3)])
    lam = np.clip(np.exp(step * (losses - losses.mean())), 1 / bound, bound)
    weights = COUNTS * lam
    expected = sum(w * MODELS[d] for d, w in enumerate(weights)) / weights.sum()
    assert np.allclose(new, expected, atol=1e-6)
    assert np.allclose(strategy.last_selection["adversary"], lam)
    plain = sum(n * MODELS[d] for d, n in enumerate(COUNTS)) / COUNTS.sum()
    assert np.linalg.norm(new - MODELS[2]) < np.linalg.norm(plain - MODELS[2])


def test_reweighting_needs_the_losses_and_refuses_dp_and_unbiased_weights():
    common = dict(registry=_registry(COUNTS), selection=UniformSelection(), devices_per_round=3)
    strategy = SampledFedAvg(**common, reweighting=AdversarialReweighting())
    with pytest.raises(FederationError, match="global_loss"):
        _round(strategy, GLOBAL, MODELS, {}, COUNTS)
    with pytest.raises(ValueError, match="unbiased"):
        SampledFedAvg(**common, weighting="unbiased", reweighting=AdversarialReweighting())
    dp = DPFedAvg.create(num_devices=3, devices_per_round=2, clip=1.0, rounds=2,
                         noise_multiplier=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="user-level DP"):
        SampledFedAvg(**common, user_dp=dp, reweighting=AdversarialReweighting())


def test_the_strategy_remembers_each_devices_last_loss():
    counts = np.array([5, 5, 5, 5])
    strategy = SampledFedAvg(registry=_registry(counts), selection=UniformSelection(),
                             devices_per_round=2)  # fmt: skip
    models = {d: np.zeros(3) for d in range(4)}
    _round(strategy, np.zeros(3), models, {d: float(d) for d in range(4)}, counts)
    chosen = strategy.last_selection["devices"]
    losses = strategy.device_losses()
    assert [d for d in range(4) if np.isfinite(losses[d])] == chosen
    assert np.allclose(losses[chosen], chosen)
    fairness = strategy.state()["fairness"]
    assert fairness["devices"].tolist() == chosen
    assert np.allclose(fairness["global_loss"], chosen)


def test_a_non_finite_device_loss_drops_that_reply_and_keeps_the_aggregate_finite():
    counts = np.array([5, 5, 5, 5])
    models = {d: np.full(3, float(d)) for d in range(4)}

    def qffl():
        return SampledQFedAvg(registry=_registry(counts), selection=UniformSelection(),
                              devices_per_round=4, client_learning_rate=0.1, q=1.0)  # fmt: skip

    strategy = qffl()
    arrays, _ = _round(strategy, np.zeros(3), models, {0: 1.0, 1: 2.0, 2: np.nan, 3: 1.5}, counts)
    assert [(f.device, f.reason) for f in strategy.last_failures] == [
        (2, "non-finite metric global_loss = nan")
    ]
    without = qffl()  # the same round where device 2 never replied
    record = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    list(without.configure_train(1, record, ConfigRecord({}), FakeGrid(4)))
    replies = [_reply(d, models[d], 5, loss) for d, loss in ((0, 1.0), (1, 2.0), (3, 1.5))]
    expected, _ = without.aggregate_train(1, replies)
    assert np.isfinite(arrays).all()
    assert np.allclose(arrays, expected["w"].numpy())


# -------------------------------------------------------------- device side, through the ClientApp


def tiny_lm() -> CharLMTask:
    return CharLMTask(kind="lm", train=[], test=[], pad_id=0, primary_metric="accuracy",
                      vocab="abcdefghij", context=16, layers=1, width=16, heads=2)  # fmt: skip


@dataclass
class Source:
    """A DeviceData over fixed rows per device."""

    task: Any
    data: list[list[dict[str, Any]]]

    @property
    def size(self) -> int:
        return len(self.data)

    def name(self, device: int) -> str:
        return f"device-{device}"

    def count(self, device: int, server_round: int) -> int:
        return len(self.data[device])

    def rows(self, device: int, server_round: int) -> list[dict[str, Any]]:
        return self.data[device]

    def stream_length(self, device: int) -> int:
        return len(self.data[device])


def _rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, 11, size=rng.integers(4, 13)).tolist()} for _ in range(n)]


LM_SOURCE = Source(tiny_lm(), [_rows(11, 0), _rows(7, 1)])  # kept alive: the app caches by id
SETTINGS = ClientSettings(epochs=1, batch_size=4, lr=1e-2, head_lr_scale=1.0, num_cpus=1)


def train_message(source, instructions: TrainInstructions, extra_config=None, records=None):
    """A training message as the server sends it: global model + config (+ server-round)."""
    glob = source.task.build_model(3)  # not the device's own initialisation
    arrays = ArrayRecord({k: v.clone() for k, v in trainable_state(glob).items()})
    config = ConfigRecord({**instructions.to_record(), "server-round": 1, **(extra_config or {})})
    content = RecordDict({"arrays": arrays, "config": config, **(records or {})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN), glob


def run_client(source, msg: Message, device: int = 0) -> Message:
    context = Context(run_id=1, node_id=1, node_config={"partition-id": device},
                      state=RecordDict(), run_config={})  # fmt: skip
    reply = make_client_app(lambda ctx: source)(msg, context)
    assert not reply.has_error(), reply.error
    return reply


def test_device_reports_the_global_models_loss_before_training(tmp_path):
    ask = TrainInstructions(SETTINGS, seed=0, state_dir=str(tmp_path), global_loss=True)
    msg, glob = train_message(LM_SOURCE, ask)
    reply = run_client(LM_SOURCE, msg)
    # independently: each row alone through the model's own (transformers) loss, eval mode
    glob.eval()
    with torch.no_grad():
        task = LM_SOURCE.task
        per_row = [float(glob(**task.collate([row])).loss) for row in LM_SOURCE.data[0]]
    assert reply.content["metrics"]["global_loss"] == pytest.approx(np.mean(per_row), rel=1e-5)
    assert reply.content["metrics"]["global_loss"] != pytest.approx(
        reply.content["metrics"]["train_loss"], rel=1e-3
    )

    plain = TrainInstructions(SETTINGS, seed=0, state_dir=str(tmp_path))
    msg, _ = train_message(LM_SOURCE, plain)
    unasked = run_client(LM_SOURCE, msg)
    assert "global_loss" not in unasked.content["metrics"]
    assert list(unasked.content.array_records) == ["arrays"]
    # measuring the loss does not change what training does
    for key, value in reply.content["arrays"].items():
        assert np.array_equal(value.numpy(), unasked.content["arrays"][key].numpy())


def test_global_loss_is_refused_under_dp(tmp_path):
    dp = DeviceDP(max_grad_norm=1.0, participations=2, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="DP"):
        TrainInstructions(SETTINGS, seed=0, state_dir=str(tmp_path), dp=dp, global_loss=True)
    record = TrainInstructions(SETTINGS, seed=0, state_dir=str(tmp_path), dp=dp).to_record()
    record["global-loss"] = True
    with pytest.raises(ValueError, match="DP"):
        TrainInstructions.from_record(record)
    ask = TrainInstructions(SETTINGS, seed=0, state_dir=str(tmp_path), global_loss=True)
    assert TrainInstructions.from_record(ask.to_record()) == ask
