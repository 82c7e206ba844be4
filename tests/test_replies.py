"""Reply screening, norm bounding, robust aggregation and the simulated faults that test them."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flower_fakes import FakeGrid, Reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtrust.clients.faults import DeviceCrash, FaultInjector, FaultSettings
from fedtrust.clients.settings import ClientSettings, TrainInstructions
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.replies import TooFewReplies, bound_update, screen_replies, update_norm
from fedtrust.simulations.config import load_config
from fedtrust.simulations.federation import make_strategy

pytestmark = pytest.mark.usefixtures("run_identity")

GLOBAL = ArrayRecord({"w": Array(np.zeros(4, np.float32)), "b": Array(np.zeros(2, np.float32))})


def _reply(device: int, w, b=(0.0, 0.0), n: int = 10, loss: float = 1.0, node=None) -> Reply:
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {"w": Array(np.asarray(w, np.float32)), "b": Array(np.asarray(b, np.float32))}
            ),
            "metrics": MetricRecord({"num-examples": n, "train_loss": loss}),
            "device": ConfigRecord({"device": device, "available": n}),
        }
    )
    return Reply(
        content, metadata=SimpleNamespace(src_node_id=100 + device if node is None else node)
    )


@dataclass
class _Err:
    reason: str


def test_every_kind_of_bad_reply_is_dropped_with_its_device_and_reason():
    expected = {100 + d: d for d in range(8)}
    good = _reply(0, [1, 1, 1, 1])
    replies = [
        _reply(1, [np.nan, 0, 0, 0]),
        _reply(2, [1, 1, 1]),  # wrong shape
        Reply(
            RecordDict(
                {**good.content, "arrays": ArrayRecord({"w": Array(np.ones(4, np.float32))})}
            ),
            metadata=SimpleNamespace(src_node_id=103),
        ),  # "b" missing (and it says it is device 0)
        _reply(4, [1, 1, 1, 1], loss=float("inf")),
        Reply(
            RecordDict(),
            error=_Err("Traceback\nRuntimeError: boom"),
            metadata=SimpleNamespace(src_node_id=105),
        ),  # fmt: skip
        _reply(3, [1, 1, 1, 1], node=106),  # node 106 is device 6 but says it is device 3
        good,
    ]  # device 7 never replies
    usable, failures, identified = screen_replies(replies, expected, GLOBAL, timeout=30)
    assert usable == [good]
    assert identified == [replies[0], replies[1], replies[3], good]  # answered as themselves
    assert [(f.device, f.reason) for f in failures] == [
        (1, "non-finite weights in w"),
        (2, "malformed weights: w has shape (3,), not (4,)"),
        (3, "malformed reply: says it is device 0"),
        (4, "non-finite metric train_loss = inf"),
        (5, "raised: RuntimeError: boom"),
        (6, "malformed reply: says it is device 3"),
        (7, "no reply within server.round_timeout = 30 s"),
    ]


def test_a_reply_missing_a_tensor_is_dropped():
    reply = _reply(0, [1, 1, 1, 1])
    del reply.content["arrays"]["b"]
    usable, failures, _ = screen_replies([reply], {100: 0}, GLOBAL)
    assert usable == [] and failures[0].reason == "malformed weights: missing b"


def test_replies_flower_would_choke_on_are_dropped_not_raised():
    no_metrics = _reply(0, [1, 1, 1, 1])
    del no_metrics.content["metrics"]
    integers = _reply(1, [1, 1, 1, 1])
    integers.content["arrays"]["w"] = Array(np.ones(4, np.int64))
    other_keys = _reply(2, [1, 1, 1, 1])
    other_keys.content["metrics"]["extra"] = 1.0
    no_available = _reply(3, [1, 1, 1, 1])
    del no_available.content["device"]["available"]
    extra_record = _reply(4, [1, 1, 1, 1])
    extra_record.content["other"] = ArrayRecord({"x": Array(np.ones(2, np.float32))})
    good = [_reply(d, [1, 1, 1, 1]) for d in (5, 6)]
    float64 = _reply(7, [1, 1, 1, 1])
    float64.content["arrays"]["w"] = Array(np.ones(4, np.float64))
    replies = [no_metrics, integers, other_keys, no_available, extra_record, *good, float64]
    usable, failures, _ = screen_replies(replies, {100 + d: d for d in range(8)}, GLOBAL)
    assert usable == [*good, float64]
    assert float64.content["arrays"]["w"].numpy().dtype == np.float32  # cast to the global's
    assert [(f.device, f.reason) for f in failures] == [
        (0, "malformed reply: needs exactly one metric record 'metrics'"),
        (1, "malformed weights: w is int64, not float32"),
        (2, "malformed reply: metrics differ from the others (extra)"),
        (3, "malformed reply: its device record lacks an integer device or available"),
        (4, "malformed reply: unexpected weight records other"),
    ]


def _strategy(*settings: str, n: int = 10):
    cfg = load_config(
        None, [f"partition.num_devices={n}", f"selection.devices_per_round={n}", *settings]
    )
    registry = DeviceRegistry({d: 100 + d for d in range(n)}, metadata=lambda r: np.full(n, 10))
    strategy = make_strategy(cfg, registry, n)
    list(strategy.configure_train(1, GLOBAL, ConfigRecord({}), FakeGrid(n)))
    return strategy


def test_garbage_never_reaches_the_average():
    honest = [_reply(d, np.full(4, d + 1.0), b=(d, -d)) for d in range(4)]
    garbage = [
        _reply(4, [np.inf, 0, 0, 0]),
        _reply(5, [1, 2, 3]),
        _reply(6, [1e3] * 4, loss=np.nan),
    ]
    with_garbage, _ = _strategy(n=7).aggregate_train(1, honest + garbage)
    clean, _ = _strategy(n=7).aggregate_train(1, [_reply(d, np.full(4, d + 1.0), b=(d, -d))
                                                   for d in range(4)])  # fmt: skip
    for key in ("w", "b"):
        assert np.array_equal(with_garbage[key].numpy(), clean[key].numpy())
    assert np.allclose(clean["w"].numpy(), 2.5)


def test_too_few_usable_replies_raise_with_the_reasons():
    strategy = _strategy("server.min_replies=3", n=4)
    replies = [_reply(0, [1, 1, 1, 1]), _reply(1, [1, 1, 1, 1]), _reply(2, [np.nan, 0, 0, 0])]
    with pytest.raises(RuntimeError, match="round 1: 2 usable replies, 3 needed") as err:
        strategy.aggregate_train(1, replies)
    assert "device 2: non-finite weights in w; device 3: no reply" in str(err.value)


@pytest.mark.parametrize("seed", range(5))
def test_norm_bounding_caps_the_update_norm_and_keeps_its_direction(seed):
    rng = np.random.default_rng(seed)
    glob = ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in
                        (("w", (3, 4)), ("b", (5,)))})  # fmt: skip
    update = {k: rng.normal(size=v.shape) * rng.uniform(0.1, 10) for k, v in glob.items()}
    reply = ArrayRecord({k: Array((glob[k].numpy() + u).astype(np.float32)) for k, u in
                         update.items()})  # fmt: skip
    norm = update_norm(reply, glob)
    for bound in (norm / 10, norm / 2, norm * 2):
        bounded = bound_update(reply, glob, bound)
        assert update_norm(bounded, glob) <= min(bound, norm) * (1 + 1e-5)
        before = np.concatenate([(reply[k].numpy() - glob[k].numpy()).ravel() for k in glob])
        after = np.concatenate([(bounded[k].numpy() - glob[k].numpy()).ravel() for k in glob])
        cosine = before @ after / np.linalg.norm(before) / np.linalg.norm(after)
        assert cosine == pytest.approx(1.0, abs=1e-5)
        assert bounded["w"].numpy().dtype == np.float32


def _attacked_round(aggregation: str, *extra: str) -> np.ndarray:
    """9 honest devices with updates near +1; devices 0 and 1 send -10x their update."""
    rng = np.random.default_rng(0)
    strategy = _strategy(f"server.aggregation={aggregation}", "server.malicious=2", *extra, n=11)
    replies = []
    for d in range(11):
        honest = 1.0 + 0.1 * rng.normal(size=4)
        replies.append(_reply(d, -10 * honest if d < 2 else honest))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["w"].numpy().dtype == np.float32
    return arrays["w"].numpy()


@pytest.mark.parametrize("aggregation", ["krum", "multikrum", "bulyan"])
def test_krum_rules_find_the_liars_on_a_large_model_with_small_updates(aggregation):
    """2M weights of size ~1, honest updates of size 5e-6 per coordinate: the distances Krum
    compares are tiny next to the weights themselves (float32 cancellation would hide them)."""
    rng = np.random.default_rng(1)
    size = 2_000_000
    glob = rng.normal(size=size).astype(np.float32)
    record = ArrayRecord({"w": Array(glob)})
    settings = ["partition.num_devices=11", "selection.devices_per_round=11"]
    cfg = load_config(None, [*settings, f"server.aggregation={aggregation}", "server.malicious=2"])
    registry = DeviceRegistry({d: 100 + d for d in range(11)}, metadata=lambda r: np.full(11, 10))
    strategy = make_strategy(cfg, registry, 11)
    list(strategy.configure_train(1, record, ConfigRecord({}), FakeGrid(11)))
    direction = rng.normal(size=size).astype(np.float32) * 5e-6
    replies = []
    for d in range(11):
        update = direction + 5e-7 * rng.normal(size=size).astype(np.float32)
        weights = glob + (-10 * update if d < 2 else update)
        replies.append(Reply(RecordDict({
            "arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": 10}),
            "device": ConfigRecord({"device": d, "available": 10}),
        }), metadata=SimpleNamespace(src_node_id=100 + d)))  # fmt: skip
    arrays, _ = strategy.aggregate_train(1, replies)
    moved = arrays["w"].numpy().astype(np.float64) - glob
    assert moved @ direction > 0.5 * direction @ direction  # with the honest, not the liars


@pytest.mark.parametrize(("aggregation", "needed"), [("krum", 7), ("multikrum", 7), ("bulyan", 11)])
def test_a_robust_rule_with_too_few_usable_replies_asks_for_a_retry(aggregation, needed):
    strategy = _strategy(f"server.aggregation={aggregation}", "server.malicious=2", n=11)
    replies = [_reply(d, [1, 1, 1, 1]) for d in range(needed - 1)]
    with pytest.raises(TooFewReplies, match=f"{needed - 1} usable replies, {needed} needed"):
        strategy.aggregate_train(1, replies)


def test_multikrum_averages_all_but_f_of_the_replies_that_came():
    strategy = _strategy("server.aggregation=multikrum", "server.malicious=1", n=10)
    replies = [_reply(d, np.full(4, float(d == 0) * 100 + 1)) for d in range(8)]  # 2 dropped
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.num_nodes_to_select == 7
    assert np.allclose(arrays["w"].numpy(), 1.0)  # the outlier is the one left out


def test_fedavg_is_dragged_by_two_lying_devices():
    assert (_attacked_round("fedavg") < 0).all()  # (9 * 1 - 2 * 10) / 11 = -1


@pytest.mark.parametrize(
    "aggregation", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]
)
def test_robust_aggregations_stay_with_the_honest_majority(aggregation):
    extra = ("server.trim_beta=0.3",) if aggregation == "fedtrimmedavg" else ()
    assert np.allclose(_attacked_round(aggregation, *extra), 1.0, atol=0.25)


def test_norm_bounding_limits_what_fedavg_loses_to_the_liars():
    bounded = _attacked_round("fedavg", "server.max_update_norm=2.5")  # honest norms are ~2
    assert (bounded > 0.3).all()


# ------------------------------------------------------------------------ simulated device faults


def test_faults_are_drawn_from_seed_round_and_device_at_their_rates():
    settings = FaultSettings(crash=0.1, slow=0.2, nan=0.3, malformed=0.4)
    draws = [FaultInjector(settings, 7, r, d) for r in range(1, 101) for d in range(20)]
    rates = [
        np.mean([getattr(f, k) for f in draws]) for k in ("crashes", "slow", "nan", "malformed")
    ]
    assert np.allclose(rates, [0.1, 0.2, 0.3, 0.4], atol=0.035)  # 2,000 draws: ~4 sigma
    again = [FaultInjector(settings, 7, r, d) for r in range(1, 101) for d in range(20)]
    assert [f.nan for f in draws] == [f.nan for f in again]
    assert [f.nan for f in draws] != [
        f.nan for f in (FaultInjector(settings, 8, r, d) for r in range(1, 101) for d in range(20))
    ]


def test_a_crashing_device_raises_and_a_byzantine_one_flips_or_scales_its_update():
    with pytest.raises(DeviceCrash, match="device 3: simulated crash"):
        FaultInjector(FaultSettings(crash=1.0), 0, 1, 3).before_training()
    received = {"w": torch.tensor([1.0, 2.0])}
    trained = {"w": torch.tensor([2.0, 2.5])}
    flip = FaultInjector(FaultSettings(byzantine=1, attack_scale=3.0), 0, 1, 0)
    assert torch.allclose(flip.corrupt(trained, received)["w"], torch.tensor([-2.0, 0.5]))
    scale = FaultInjector(FaultSettings(byzantine=1, attack="scale", attack_scale=3.0), 0, 1, 0)
    assert torch.allclose(scale.corrupt(trained, received)["w"], torch.tensor([4.0, 3.5]))
    honest = FaultInjector(FaultSettings(byzantine=1), 0, 1, device=1)
    assert honest.corrupt(trained, received)["w"] is trained["w"]


def test_nan_and_malformed_faults_produce_what_screening_drops():
    trained = {"w": torch.ones(4), "b": torch.zeros(2)}
    nan = FaultInjector(FaultSettings(nan=1.0), 0, 1, 0).corrupt(trained, trained)
    assert torch.isnan(nan["w"]).any() and not torch.isnan(trained["w"]).any()
    bad = FaultInjector(FaultSettings(malformed=1.0), 0, 1, 0).corrupt(trained, trained)
    assert set(bad) == {"b"} and bad["b"].shape == (3, 1)
    metrics = FaultInjector(FaultSettings(nan_metric=1.0), 0, 1, 0).corrupt_metrics({"x": 1.0})
    assert np.isnan(metrics["train_loss"]) and metrics["x"] == 1.0


def test_faults_travel_with_the_training_instructions():
    faults = FaultSettings(crash=0.5, byzantine=2, attack="scale")
    sent = TrainInstructions(ClientSettings(), seed=1, state_dir="x", faults=faults)
    assert TrainInstructions.from_record(sent.to_record()).faults == faults
    assert (
        TrainInstructions.from_record(
            TrainInstructions(ClientSettings(), seed=1, state_dir="x").to_record()
        ).faults
        is None
    )
