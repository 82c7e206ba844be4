"""Compressed updates and models on the wire: what the server aggregates from compressed replies,
the lossless downlink, and the bytes a message weighs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flower_fakes import FakeGrid, Reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtrust.clients.downlink import HeldModels
from fedtrust.clients.updates import ResidualStore, encode_update
from fedtrust.compression import CompressionSettings, decode, encode, round_hash_seed
from fedtrust.compression.lossless import apply_changes, changed_entries, state_crc
from fedtrust.compression.varint import encode_positions
from fedtrust.server.downlink import DOWNLINK_KEY, Downlink
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.wire import content_bytes, message_bytes
from fedtrust.simulations.config import load_config
from fedtrust.simulations.federation import make_strategy

pytestmark = pytest.mark.usefixtures("run_identity")

SHAPES = {"w": (40, 30), "b": (30,)}


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _reply(device: int, arrays: ArrayRecord, n: int = 10) -> Reply:
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
            "device": ConfigRecord({"device": device, "available": n}),
        }
    )
    return Reply(content, metadata=SimpleNamespace(src_node_id=100 + device))


def _strategy(method: str, n: int, glob: dict[str, np.ndarray], *settings: str):
    cfg = load_config(
        None,
        [
            f"partition.num_devices={n}",
            f"selection.devices_per_round={n}",
            f"compression.method={method}",
            *settings,
        ],
    )
    registry = DeviceRegistry({d: 100 + d for d in range(n)}, metadata=lambda r: np.full(n, 10))
    strategy = make_strategy(cfg, registry, n)
    messages = list(strategy.configure_train(1, _record(glob), ConfigRecord({}), FakeGrid(n)))
    return strategy, messages


def _updates(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [
        {k: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("topk", ["compression.density=0.05"]),
        ("quantize", []),
        ("hashed-diff", ["compression.density=0.05"]),
    ],
)
def test_compressed_replies_aggregate_exactly_like_their_decoded_dense_ones(method, extra):
    glob, n = _global(), 5
    settings = CompressionSettings(method=method, density=0.05)
    shared = round_hash_seed(0, 1)  # a hashed round's devices share its hash (run seed 0)
    payloads = [
        encode(u, settings, seed=shared if method == "hashed-diff" else i, rounding_seed=i)
        for i, u in enumerate(_updates(n))
    ]
    compressed, _ = _strategy(method, n, glob, *extra)
    got, _ = compressed.aggregate_train(
        1,
        [
            _reply(d, ArrayRecord({k: Array(v.numpy()) for k, v in p.items()}))
            for d, p in enumerate(payloads)
        ],  # fmt: skip
    )
    dense_replies = []
    for d, p in enumerate(payloads):
        update = decode(p, SHAPES)
        dense_replies.append(_reply(d, _record({k: glob[k] + update[k].numpy() for k in glob})))
    plain, _ = _strategy("none", n, glob)
    want, _ = plain.aggregate_train(1, dense_replies)
    for key in SHAPES:
        assert np.array_equal(got[key].numpy(), want[key].numpy())
    assert not np.array_equal(want["w"].numpy(), glob["w"])  # the round did move the model


def test_an_undecodable_payload_is_dropped_with_its_reason():
    glob, n = _global(), 3
    settings = CompressionSettings(method="topk", density=0.05)
    good = [encode(u, settings, seed=0) for u in _updates(2)]
    strategy, _ = _strategy("topk", n, glob)
    bad = {k: v.clone() for k, v in good[0].items()}
    bad["w.pos"] = torch.from_numpy(encode_positions(np.array([10**6])))  # outside the tensor
    replies = [
        _reply(d, ArrayRecord({k: Array(v.numpy()) for k, v in p.items()}))
        for d, p in enumerate([good[0], good[1], bad])
    ]
    strategy.aggregate_train(1, replies)
    assert [f.device for f in strategy.last_failures] == [2]
    assert strategy.last_failures[0].reason.startswith("undecodable update:")


def test_a_hashed_reply_outside_the_rounds_subspace_is_dropped():
    """Every device of a round hashes alike (the round's seed, the configured bucket total);
    a reply hashed otherwise is dropped, named; an unencoded (faulty) reply is screened."""
    glob, n = _global(), 4
    entries = sum(int(np.prod(s)) for s in SHAPES.values())
    settings = CompressionSettings(method="hashed-diff", density=0.05)
    right = round_hash_seed(0, 1)
    other_total = CompressionSettings(
        method="hashed-diff", buckets=settings.bucket_count(entries) + 7
    )
    updates = _updates(n)
    payloads = [
        encode(updates[0], settings, seed=right),
        encode(updates[1], settings, seed=right + 1),
        encode(updates[2], other_total, seed=right),
        {k: torch.from_numpy(glob[k]) + u for k, u in updates[3].items()},  # dense weights
    ]
    strategy, _ = _strategy("hashed-diff", n, glob, "compression.density=0.05")
    replies = [
        _reply(d, ArrayRecord({k: Array(v.numpy()) for k, v in p.items()}))
        for d, p in enumerate(payloads)
    ]
    strategy.aggregate_train(1, replies)
    failures = {f.device: f.reason for f in strategy.last_failures}
    assert sorted(failures) == [1, 2]
    assert "hash.seed" in failures[1] and f"not this round's {right}" in failures[1]
    assert "hash.total" in failures[2]


def test_lossless_changes_rebuild_the_new_model_bit_for_bit():
    old = _global(0)
    new = {k: v.copy() for k, v in old.items()}
    rng = np.random.default_rng(3)
    picked = rng.choice(new["w"].size, 30, replace=False)
    new["w"].reshape(-1)[picked] += rng.normal(size=30).astype(np.float32)
    new["b"] = rng.normal(size=SHAPES["b"]).astype(np.float32)  # all changed: sent dense
    changes = changed_entries(new, old)
    assert set(changes) == {"w.pos", "w.val", "b"}
    rebuilt = apply_changes(old, changes)
    for k in new:
        assert np.array_equal(rebuilt[k], new[k])
    assert state_crc(rebuilt) == state_crc(new) != state_crc(old)
    assert sum(a.nbytes for a in changes.values()) < sum(a.nbytes for a in new.values())
    with pytest.raises(ValueError, match="outside"):
        apply_changes(
            old, {"w.pos": encode_positions(np.array([10**6])), "w.val": np.ones(1, np.float32)}
        )


def _versions(count: int) -> list[dict[str, np.ndarray]]:
    """A model over `count` rounds, each changing a few entries (a sparse aggregate)."""
    out, rng = [_global(0)], np.random.default_rng(5)
    for _ in range(count - 1):
        nxt = {k: v.copy() for k, v in out[-1].items()}
        nxt["w"].reshape(-1)[rng.choice(nxt["w"].size, 12, replace=False)] += 1.0
        out.append(nxt)
    return out


ASKED = {0: (0, 2, 4), 1: (1, 3, 5), 2: (0, 5)}  # device -> the versions it is sent


def test_the_downlink_rebuilds_every_version_on_devices_and_sends_less(tmp_path):
    versions = _versions(6)
    downlink = Downlink(history=3)
    held = {d: HeldModels(tmp_path, versions[0]) for d in range(3)}
    dense = content_bytes(RecordDict({"arrays": _record(versions[0])}))
    sizes = {}
    for version, state in enumerate(versions):
        downlink.remember(version, _record(state))
        for device in range(3):
            if version not in ASKED[device]:
                continue
            arrays, info = downlink.message(device, version)
            rebuilt = held[device].receive(arrays, info)
            for k in state:
                assert np.array_equal(rebuilt[k], state[k])
            downlink.held[device] = version  # it answered (Downlink.answered)
            sizes[(device, version)] = (
                content_bytes(RecordDict({"arrays": arrays, DOWNLINK_KEY: info})),
                info["base-version"],
            )
    # device 2 holds version 0, outside the window of 3 by version 5: the full model
    assert [key for key, (_, base) in sizes.items() if base < 0] == [(2, 5)]
    assert sizes[(2, 5)][0] > dense
    assert all(size < dense / 4 for size, base in sizes.values() if base >= 0)
    kept = sorted(int(p.stem.split("-")[0]) for p in (tmp_path / "held").glob("*.npz"))
    assert kept and min(kept) >= downlink.oldest  # versions outside the window are deleted


def test_a_rebuilt_model_that_does_not_match_the_server_is_an_error(tmp_path):
    versions = _versions(2)
    downlink = Downlink()
    for v, state in enumerate(versions):
        downlink.remember(v, _record(state))
    arrays, info = downlink.message(0, 1)
    wrong = {k: v + 1 for k, v in versions[0].items()}  # the device holds another model
    with pytest.raises(ValueError, match="checksum"):
        HeldModels(tmp_path, wrong).receive(arrays, info)


def test_message_bytes_are_the_serialised_size():
    small = content_bytes(RecordDict({"arrays": _record({"w": np.zeros(10, np.float32)})}))
    large = content_bytes(RecordDict({"arrays": _record({"w": np.zeros(1010, np.float32)})}))
    assert 4000 <= large - small <= 4008  # the values, plus a few bytes of length fields


def test_counting_shared_records_once_gives_the_serialised_total():
    shared = _record(_global(0))
    messages = [
        Reply(RecordDict({"arrays": shared, "config": ConfigRecord({"device": d})}))
        for d in range(3)
    ]
    assert message_bytes(messages) == sum(content_bytes(m.content) for m in messages)


def test_each_device_gets_its_own_downlink_message(tmp_path):
    """Flower builds a round's messages around one shared content: every device must still
    get the delta against the version it holds (here: one holds version 1, one version 0)."""
    versions = _versions(3)
    strategy, _ = _strategy("topk", 2, versions[0])
    downlink = strategy.downlink
    for v in range(3):
        downlink.remember(v, _record(versions[v]))
    downlink.held = {0: 1, 1: 0}
    messages = list(
        strategy.configure_train(3, _record(versions[2]), ConfigRecord({}), FakeGrid(2))
    )
    by_device = {strategy._expected[m.metadata.dst_node_id]: m for m in messages}
    assert by_device[0].content is not by_device[1].content
    for device, base in ((0, 1), (1, 0)):
        info = by_device[device].content["compression"]
        assert info["base-version"] == base
        held = HeldModels(tmp_path / str(device), versions[0])
        if base:
            held._keep(base, state_crc(versions[base]), versions[base], 0)
        rebuilt = held.receive(by_device[device].content["arrays"], info)
        assert all(np.array_equal(rebuilt[k], versions[2][k]) for k in SHAPES)


def test_a_sign_flip_of_zero_is_a_change():
    old = {"w": np.array([-0.0, 1.0], np.float32)}
    new = {"w": np.array([0.0, 1.0], np.float32)}  # equal as numbers, not as bytes
    rebuilt = apply_changes(old, changed_entries(new, old))
    assert state_crc(rebuilt) == state_crc(new)


def test_a_device_carries_on_from_the_residual_of_its_last_used_reply(tmp_path):
    """Error feedback: a reply the server did not aggregate sent nothing; the device's next
    participation must carry on from the residual of the last reply that was used."""
    store, settings = ResidualStore(tmp_path), CompressionSettings(method="topk", density=0.1)
    update = _updates(1)[0]
    encode_update(update, settings, store, 0, 1, seed=0, residual_round=-1)  # used
    encode_update(update, settings, store, 0, 2, seed=0, residual_round=1)  # dropped
    after_one = store.load(0, 1)
    # round 3: the server says round 1's reply was the last one it used
    payload = encode_update(update, settings, store, 0, 3, seed=0, residual_round=1)
    sent = decode(payload, SHAPES)
    for k in SHAPES:  # what was sent + the new residual = this update + round 1's residual
        total = sent[k] + store.load(0, 3)[k]
        assert torch.allclose(total, update[k] + after_one[k], atol=1e-6)


def test_residuals_of_another_run_are_not_taken_for_this_ones(tmp_path):
    """A real device's storage outlives runs: round 1's residual of run A is not run B's."""
    settings = CompressionSettings(method="topk", density=0.1)
    first, second = ResidualStore(tmp_path, run="runs/a"), ResidualStore(tmp_path, run="runs/b")
    encode_update(_updates(1)[0], settings, first, 0, 1, seed=0)
    assert first.load(0, 1) is not None and second.load(0, 1) is None
