"""Cohort fine-tuning under EWC: the strategy's phase (hand-made replies) and the device's side
(Fisher diagonal and EWC penalty, through the ClientApp with a tiny bag-of-words classifier)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
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
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedtrust.clients.app import make_client_app
from fedtrust.clients.settings import ClientSettings, DeviceDP, TrainInstructions
from fedtrust.clients.train import EWCPenalty, train_local
from fedtrust.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtrust.server.finetune import CohortFinetune, Upweighted
from fedtrust.server.qffl import SampledQFedAvg
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.selection import ActivitySelection, UniformSelection
from fedtrust.server.strategy import SampledFedAvg
from fedtrust.server.user_dp import DPFedAvg
from fedtrust.tasks import Task, trainable_state

pytestmark = pytest.mark.usefixtures("run_identity")

N = 8
COUNTS = np.array([10, 20, 30, 40, 15, 25, 35, 45])


class WorstHalf:
    """find_worst: devices whose loss is above the median of those known; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, counts: np.ndarray, losses: np.ndarray) -> np.ndarray:
        self.calls.append((counts.copy(), losses.copy()))
        return np.nan_to_num(losses, nan=-np.inf) > np.nanmedian(losses)


def _strategy(total=6, rounds=2, ewc=10.0, upweight=4.0, finder=None, selection=None, k=3):
    return SampledFedAvg(
        registry=DeviceRegistry({d: 100 + d for d in range(N)}, metadata=lambda r: COUNTS),
        selection=selection or UniformSelection(),
        devices_per_round=k,
        total_rounds=total,
        finetune=CohortFinetune(rounds, upweight, ewc, finder or WorstHalf()),
    )


def _glob(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, np.float32)), "b": Array(np.zeros(2))})


def _configure(strategy, server_round: int) -> list[Message]:
    return list(strategy.configure_train(server_round, _glob(), ConfigRecord({}), FakeGrid(N)))


def _reply(device: int, fisher: np.ndarray | None, loss: float) -> Reply:
    records: dict[str, Any] = {
        "arrays": ArrayRecord({"w": Array(np.full(3, device, np.float32)), "b": Array(np.ones(2))}),
        "metrics": MetricRecord({"num-examples": int(COUNTS[device]), "global_loss": loss}),
        "device": ConfigRecord({"device": device, "available": int(COUNTS[device])}),
    }
    if fisher is not None:
        records["fisher"] = ArrayRecord({"w": Array(fisher.astype(np.float32)),
                                         "b": Array(fisher[:2].astype(np.float64))})  # fmt: skip
    return Reply(RecordDict(records))


def _fisher_of(device: int) -> np.ndarray:
    return np.array([device + 1.0, 2.0 * device, 0.5])


def _train_round(strategy, server_round: int, with_fisher: bool):
    messages = _configure(strategy, server_round)
    chosen = strategy.last_selection["devices"]
    replies = [_reply(d, _fisher_of(d) if with_fisher else None, 0.1 * d) for d in chosen]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return messages, chosen, arrays


def test_fisher_is_asked_only_the_round_before_the_phase_and_averaged_by_examples():
    strategy = _strategy(total=6, rounds=2)  # phase: rounds 5 and 6; Fisher round 4
    for server_round in (1, 2, 3):
        messages, _, _ = _train_round(strategy, server_round, with_fisher=False)
        config = messages[0].content["config"]
        assert "fisher" not in config and "ewc-lambda" not in config
        assert list(messages[0].content.array_records) == ["arrays"]
        assert "fisher" not in strategy.state()
    messages, chosen, arrays = _train_round(strategy, 4, with_fisher=True)
    assert messages[0].content["config"]["fisher"] is True
    assert "ewc-lambda" not in messages[0].content["config"]
    n = COUNTS[chosen].astype(float)
    expected = sum(n_i * _fisher_of(d) for n_i, d in zip(n, chosen)) / n.sum()
    # scaled to mean 1 over all coordinates (w and b together), so ewc_lambda is scale-free
    expected *= 5 / (expected.sum() + expected[:2].sum())
    fisher = strategy.state()["fisher"]
    assert np.allclose(fisher["w"], expected, rtol=1e-6) and fisher["w"].dtype == np.float32
    assert np.allclose(fisher["b"], expected[:2]) and fisher["b"].dtype == np.float64
    # Flower's FedAvg got the replies without their Fisher record: the usual weighted mean
    assert np.allclose(arrays["w"].numpy(), (n * chosen).sum() / n.sum())

    for server_round in (5, 6):
        messages, _, _ = _train_round(strategy, server_round, with_fisher=False)
        for msg in messages:
            assert msg.content["config"]["ewc-lambda"] == 10.0
            assert "fisher" not in msg.content["config"]
            assert np.array_equal(msg.content["fisher"]["w"].numpy(), fisher["w"])
            assert sorted(msg.content.array_records) == ["arrays", "fisher"]


def test_the_cohort_is_named_once_from_the_remembered_losses():
    finder = WorstHalf()
    strategy = _strategy(total=6, rounds=2, finder=finder)
    seen: dict[int, float] = {}
    for server_round in range(1, 5):
        _, chosen, _ = _train_round(strategy, server_round, with_fisher=server_round == 4)
        seen |= {d: 0.1 * d for d in chosen}
    assert not finder.calls
    _configure(strategy, 5)
    _configure(strategy, 6)
    assert len(finder.calls) == 1
    counts, losses = finder.calls[0]
    assert np.array_equal(counts, COUNTS)
    expected = np.array([seen.get(d, np.nan) for d in range(N)])
    assert np.allclose(losses, expected, equal_nan=True)
    cohort = strategy.state()["fairness"]["cohort"]
    chosen = strategy.last_selection["devices"]
    assert strategy.last_selection["cohort_chosen"] == int(cohort[chosen].sum())
    assert strategy.last_selection["cohort_size"] == int(cohort.sum()) > 0


def _cohort_share(finetune: bool, rounds: int = 300) -> float:
    """Share of the chosen devices that are in the cohort {0, 1, 2} over `rounds` rounds."""
    cohort = np.arange(N) < 3
    strategy = _strategy(total=rounds + 1, rounds=rounds, ewc=0.0, upweight=5.0,
                         finder=lambda counts, losses: cohort,
                         selection=ActivitySelection(1.0))  # fmt: skip
    if not finetune:
        strategy.finetune = None
    strategy.load_state({"fairness": {"devices": np.arange(N), "global_loss": np.ones(N)}})
    picks = []
    for server_round in range(2, rounds + 2):
        _configure(strategy, server_round)
        picks += strategy.last_selection["devices"]
    return float(np.isin(picks, np.flatnonzero(cohort)).mean())


def test_the_upweighted_cohort_is_selected_more_often():
    plain, upweighted = _cohort_share(False), _cohort_share(True)
    # activity selection favours heavy devices; the cohort is the three lightest-but-one
    assert upweighted > plain + 0.2, (plain, upweighted)


def test_upweighted_inclusion_probabilities_come_from_the_same_sampler():
    mask = np.arange(N) < 3
    base = ActivitySelection(1.0, floor=0.2)
    up = Upweighted(base, mask, 5.0)
    assert up.floor == 0.2
    chosen, inclusion = up.select(COUNTS, 3, np.random.default_rng(0))
    assert len(chosen) == 3 and inclusion.sum() == pytest.approx(3.0, abs=0.05)
    _, plain = base.select(COUNTS, 3, np.random.default_rng(0))
    assert np.all(inclusion[mask] > plain[mask]) and np.all(inclusion[~mask] < plain[~mask])
    draws = np.array([up.draw(COUNTS, 3, np.random.default_rng(s)) for s in range(2000)])
    freq = np.bincount(draws.ravel(), minlength=N) / len(draws)
    assert np.allclose(freq, inclusion, atol=0.04)


def test_without_any_reported_loss_nobody_is_upweighted_but_ewc_applies():
    finder = WorstHalf()
    strategy = _strategy(total=3, rounds=1, finder=finder)
    _configure(strategy, 1)
    _train_round(strategy, 2, with_fisher=True)
    strategy.load_state({"fisher": strategy.state()["fisher"]})  # forget the losses
    messages = _configure(strategy, 3)
    assert not finder.calls and strategy.last_selection["cohort_size"] == 0
    assert messages[0].content["config"]["ewc-lambda"] == 10.0 and "fisher" in messages[0].content


def test_state_round_trips_through_a_checkpoint(tmp_path):
    strategy = _strategy(total=6, rounds=2)
    for server_round in range(1, 6):
        _train_round(strategy, server_round, with_fisher=server_round == 4)
    state = strategy.state()
    assert set(state) == {"fairness", "fisher"}
    save_checkpoint(tmp_path, Checkpoint(5, {"w": np.zeros(3)}, state))
    resumed = _strategy(total=6, rounds=2)
    resumed.load_state(load_checkpoint(tmp_path).strategy_state)
    again = resumed.state()
    for section in state:
        assert set(again[section]) == set(state[section])
        for key, value in state[section].items():
            assert np.array_equal(again[section][key], value, equal_nan=True)
            assert again[section][key].dtype == value.dtype
    assert np.array_equal(resumed.device_losses(), strategy.device_losses(), equal_nan=True)
    original, restored = _configure(strategy, 6), _configure(resumed, 6)
    assert resumed.last_selection == strategy.last_selection
    assert np.array_equal(original[0].content["fisher"]["w"].numpy(),
                          restored[0].content["fisher"]["w"].numpy())  # fmt: skip


def test_finetuning_settings_are_checked():
    finder = WorstHalf()
    with pytest.raises(ValueError, match="total_rounds"):
        _strategy(total=2, rounds=2)
    with pytest.raises(ValueError):
        CohortFinetune(0, 2.0, 1.0, finder)
    dp = DPFedAvg.create(num_devices=N, devices_per_round=2, clip=1.0, rounds=4,
                         noise_multiplier=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="user-level DP"):
        SampledFedAvg(registry=DeviceRegistry(), selection=UniformSelection(),
                      devices_per_round=2, user_dp=dp, total_rounds=4,
                      finetune=CohortFinetune(1, 2.0, 1.0, finder))  # fmt: skip


# --------------------------------------------------------------------------- device side


VOCAB, CLASSES = 6, 3


class BagOfWords(nn.Module):
    """logits = W x + b, x = the row's token frequencies (padding left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(VOCAB, CLASSES)

    def forward(self, input_ids, attention_mask, labels=None):
        x = nn.functional.one_hot(input_ids, VOCAB).float() * attention_mask[..., None]
        x = x.sum(1) / attention_mask.sum(1, keepdim=True)
        logits = self.linear(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


@dataclass
class BowTask(Task):
    def build_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return BagOfWords()

    def _labels(self, rows, ids, mask):
        return torch.tensor([r["labels"] for r in rows])


def _bow_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(CLASSES))
        ids = rng.integers(1, VOCAB, size=rng.integers(2, 7))
        ids[0] = label + 1  # a telling first word
        rows.append({"input_ids": ids.tolist(), "labels": label})
    return rows


@dataclass
class Source:
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


BOW = Source(BowTask(kind="intent", train=[], test=[], pad_id=0, primary_metric="accuracy"),
             [_bow_rows(13, 0)])  # fmt: skip
SETTINGS = ClientSettings(epochs=10, batch_size=4, lr=0.05, head_lr_scale=1.0, num_cpus=1)


def _message(tmp_path, extra_config=None, records=None, dp=None):
    glob = BOW.task.build_model(7)
    arrays = ArrayRecord({k: v.clone() for k, v in trainable_state(glob).items()})
    instructions = TrainInstructions(SETTINGS, seed=0, state_dir=str(tmp_path), dp=dp)
    config = ConfigRecord({**instructions.to_record(), "server-round": 1, **(extra_config or {})})
    content = RecordDict({"arrays": arrays, "config": config, **(records or {})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN), glob


def _run(msg: Message) -> Message:
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})  # fmt: skip
    return make_client_app(lambda ctx: BOW)(msg, context)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_the_devices_fisher_diagonal_equals_a_hand_computation(tmp_path):
    msg, glob = _message(tmp_path, {"fisher": True})
    reply = _run(msg)
    assert not reply.has_error(), reply.error
    fisher = reply.content["fisher"]
    # by hand: length-sorted batches of 4; the gradient of the batch-mean cross-entropy of a
    # linear softmax model is (P - Y)^T X / B for W and mean(P - Y) for b
    W = glob.linear.weight.detach().double().numpy()
    b = glob.linear.bias.detach().double().numpy()
    rows = BOW.data[0]
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    fw, fb, batches = np.zeros_like(W), np.zeros_like(b), 0
    for start in range(0, len(rows), 4):
        batch = [rows[i] for i in order[start : start + 4]]
        X = np.array([np.bincount(r["input_ids"], minlength=VOCAB) / len(r["input_ids"])
                      for r in batch])  # fmt: skip
        Y = np.eye(CLASSES)[[r["labels"] for r in batch]]
        G = _softmax(X @ W.T + b) - Y
        fw += (G.T @ X / len(batch)) ** 2
        fb += G.mean(0) ** 2
        batches += 1
    assert np.allclose(fisher["linear.weight"].numpy(), fw / batches, rtol=1e-4, atol=1e-9)
    assert np.allclose(fisher["linear.bias"].numpy(), fb / batches, rtol=1e-4, atol=1e-9)
    assert "fisher" not in _run(_message(tmp_path)[0]).content


def _trained(tmp_path, ewc_lambda: float | None, fisher: dict[str, torch.Tensor]):
    extra = {} if ewc_lambda is None else {"ewc-lambda": ewc_lambda}
    records = {} if ewc_lambda is None else {"fisher": ArrayRecord(fisher)}
    msg, glob = _message(tmp_path, extra, records)
    reply = _run(msg)
    assert not reply.has_error(), reply.error
    start = {k: v.numpy() for k, v in trainable_state(glob).items()}
    return {k: reply.content["arrays"][k].numpy() - start[k] for k in start}


def test_ewc_pulls_local_training_towards_the_global_model(tmp_path):
    # high Fisher on the weight's first two rows, none on the rest and on the bias
    fw = torch.zeros(CLASSES, VOCAB)
    fw[:2] = 1.0
    fisher = {"linear.weight": fw, "linear.bias": torch.zeros(CLASSES)}
    plain = _trained(tmp_path, None, fisher)
    assert np.abs(plain["linear.weight"][:2]).max() > 0.1  # training moves these a lot
    same = _trained(tmp_path, 0.0, fisher)
    for key in plain:
        assert np.array_equal(same[key], plain[key])  # lambda = 0 is plain training
    held = _trained(tmp_path, 1e6, fisher)
    assert np.abs(held["linear.weight"][:2]).max() < 0.1 * np.abs(plain["linear.weight"][:2]).max()
    # coordinates without Fisher stay free to move
    assert np.abs(held["linear.weight"][2]).max() > 0.1 * np.abs(plain["linear.weight"][2]).max()


def test_the_ewc_penalty_is_half_lambda_times_the_fisher_weighted_distance():
    model = BOW.task.build_model(1)
    anchor = {k: v.clone() + 0.5 for k, v in trainable_state(model).items()}
    fisher = {"linear.weight": torch.full((CLASSES, VOCAB), 2.0)}
    penalty = EWCPenalty(fisher, anchor, ewc_lambda=3.0)(model)
    assert float(penalty) == pytest.approx(3.0 / 2 * 2.0 * 0.25 * CLASSES * VOCAB, rel=1e-6)
    with pytest.raises(ValueError, match="DP"):
        train_local(model, BOW.task, BOW.data[0], SETTINGS, 0,
                    dp=object(), penalty=EWCPenalty(fisher, anchor, 1.0))  # fmt: skip


def test_fisher_and_ewc_are_refused_under_dp(tmp_path):
    dp = DeviceDP(max_grad_norm=1.0, participations=2, noise_multiplier=1.0)
    for extra in ({"fisher": True}, {"ewc-lambda": 1.0}):
        msg, _ = _message(tmp_path, extra, dp=dp)
        with pytest.raises(ValueError, match="DP"):
            _run(msg)


def test_flowers_fedavg_refuses_a_reply_with_two_array_records():
    """Why the strategy strips the Fisher record before Flower aggregates."""
    reply = _reply(0, _fisher_of(0), 0.1)
    reply.content["metrics"]["agg-weight"] = 1.0
    with pytest.raises(InconsistentMessageReplies, match="exactly one ArrayRecord"):
        FedAvg(weighted_by_key="agg-weight").aggregate_train(1, [reply])


def test_qffl_aggregates_the_fisher_round_without_the_fisher_records():
    def qffl():
        return SampledQFedAvg(
            registry=DeviceRegistry({d: 100 + d for d in range(N)}, metadata=lambda r: COUNTS),
            selection=UniformSelection(), devices_per_round=3, client_learning_rate=0.1, q=1.0,
            total_rounds=3, finetune=CohortFinetune(1, 2.0, 1.0, WorstHalf()),
        )  # fmt: skip

    with_fisher, without = qffl(), qffl()
    _configure(with_fisher, 1)
    _configure(without, 1)
    chosen = with_fisher.last_selection["devices"]
    a, _ = with_fisher.aggregate_train(1, [_reply(d, _fisher_of(d), 0.1 + d) for d in chosen])
    b, _ = without.aggregate_train(1, [_reply(d, None, 0.1 + d) for d in chosen])
    assert np.array_equal(a["w"].numpy(), b["w"].numpy())
    assert "fisher" not in with_fisher.state()  # round 1 is not the Fisher round (round 2 is)
    _configure(with_fisher, 2)
    chosen = with_fisher.last_selection["devices"]
    with_fisher.aggregate_train(2, [_reply(d, _fisher_of(d), 0.1 + d) for d in chosen])
    assert "fisher" in with_fisher.state()
