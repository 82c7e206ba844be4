"""Update compression end to end: every method through Flower + Ray on the tiny BERT, bytes
counted on the wire, DP's ε untouched by compression (post-processing), exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_runs import tiny_run_config

from fedtrust.clients.updates import RESIDUALS
from fedtrust.simulations.runner import simulate

pytestmark = pytest.mark.slow  # Flower simulation engine + Ray

METHODS = {
    "topk": ["compression.method='topk'", "compression.density=0.05"],
    "sparse-diff": ["compression.method='sparse-diff'", "compression.density=0.05"],
    "sparse-diff-8bit": [
        "compression.method='sparse-diff'",
        "compression.density=0.05",
        "compression.bits=8",
    ],
    "hashed-diff": ["compression.method='hashed-diff'", "compression.density=0.05"],
    "quantize-4bit": ["compression.method='quantize'", "compression.bits=4"],
}
# bytes per sent entry: int32 index + float32 value; 8-bit values; 4-bit codes
LEAST_SAVING = {"topk": 8, "sparse-diff": 8, "sparse-diff-8bit": 12, "hashed-diff": 15}
LEAST_SAVING["quantize-4bit"] = 6


def _cfg(tmp_path, tiny_bert, data, name, *extra):
    return tiny_run_config(
        tmp_path,
        tiny_bert,
        data,
        name,
        "partition.num_devices=6",
        "selection.devices_per_round=3",
        "server.rounds=3",
        "client.epochs=2",
        "client.batch_size=4",
        *extra,
    )


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tiny_bert, intent_jsonl):
    out = tmp_path_factory.mktemp("dense")
    run_dir, summary = simulate(_cfg(out, tiny_bert, intent_jsonl, "dense"))
    return _rows(run_dir), summary


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_flower_and_sends_fewer_bytes(
    tmp_path, tiny_bert, intent_jsonl, dense, method
):
    dense_rows, dense_summary = dense
    run_dir, summary = simulate(_cfg(tmp_path, tiny_bert, intent_jsonl, method, *METHODS[method]))
    rows = _rows(run_dir)
    assert not any(r["failures"] for r in rows)  # every compressed reply decoded and was used
    for row, ref in zip(rows, dense_rows):
        assert row["uplink_bytes"] * LEAST_SAVING[method] < ref["uplink_bytes"]
    # the downlink: devices build the initial model themselves, so round 1 sends no weights;
    # later rounds send what changed since the version a device holds (or the full model)
    assert rows[0]["downlink_bytes"] * 100 < dense_rows[0]["downlink_bytes"]
    assert all(r["downlink_bytes"] <= 1.01 * d["downlink_bytes"] for r, d in zip(rows, dense_rows))
    traffic = summary["traffic"]
    assert traffic["uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    assert traffic["downlink_bytes"] == sum(r["downlink_bytes"] for r in rows)
    assert traffic["compression"] == METHODS[method][0].split("'")[1]
    # it learned: the loss on the test split fell below the initial model's
    initial = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert rows[-1]["loss"] < initial["loss"] - 0.05, (rows[-1], initial)


def test_sparse_updates_make_the_downlink_smaller_than_full_models(
    tmp_path, tiny_bert, intent_jsonl, dense
):
    dense_rows, _ = dense
    run_dir, _ = simulate(
        _cfg(
            tmp_path,
            tiny_bert,
            intent_jsonl,
            "sparse",
            *METHODS["topk"],
            "server.rounds=4",
            "partition.num_devices=3",
        )  # fmt: skip
    )
    rows = _rows(run_dir)
    # 3 devices, all asked every round: each holds the previous version, and a round of 5%
    # top-k updates changes at most 15% of the entries
    assert all(r["downlink_bytes"] < dense_rows[0]["downlink_bytes"] / 2 for r in rows)


@pytest.mark.parametrize("level", ["sample", "user"])
def test_compression_does_not_change_the_privacy_guarantee(
    tmp_path, tiny_bert, intent_jsonl, level
):
    dp = [f"privacy.level='{level}'", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0"]
    plain_dir, _ = simulate(_cfg(tmp_path, tiny_bert, intent_jsonl, "plain", *dp))
    packed_dir, _ = simulate(
        _cfg(tmp_path, tiny_bert, intent_jsonl, "packed", *dp, *METHODS["topk"])
    )
    plain, packed = _rows(plain_dir), _rows(packed_dir)
    assert [r["epsilon"] for r in packed] == [r["epsilon"] for r in plain]
    assert packed[-1]["epsilon"] > 0
    assert all(p["uplink_bytes"] * 4 < d["uplink_bytes"] for p, d in zip(packed, plain))


class _Stop(Exception):
    pass


def test_a_resumed_run_with_error_feedback_equals_an_uninterrupted_one(
    tmp_path, tiny_bert, intent_jsonl
):
    extra = [*METHODS["topk"], "server.rounds=4", "partition.num_devices=3"]
    whole_dir, _ = simulate(_cfg(tmp_path, tiny_bert, intent_jsonl, "whole", *extra))

    def stop_after_two(row):
        if row["round"] == 2:
            raise _Stop

    cfg = _cfg(tmp_path, tiny_bert, intent_jsonl, "stopped", *extra)
    with pytest.raises(Exception):  # noqa: B017 - the hook's stop, as Flower re-raises it
        simulate(cfg, on_round=stop_after_two)
    stopped = tmp_path / "stopped"
    assert any((stopped / "devices" / RESIDUALS).rglob("*.safetensors"))  # residuals on the devices
    resumed_dir, _ = simulate(cfg, resume=stopped)
    whole = load_file(str(whole_dir / "model" / "model.safetensors"))
    resumed = load_file(str(resumed_dir / "model" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert np.array_equal(whole[key], resumed[key]), key
    assert [r["uplink_bytes"] for r in _rows(whole_dir)] == [
        r["uplink_bytes"] for r in _rows(resumed_dir)
    ]
