"""Faulty devices through Flower + Ray: crashes, stragglers, garbage and liars are survived."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_runs import tiny_run_config

from fedtrust.clients.faults import FaultInjector
from fedtrust.errors import FederationError
from fedtrust.simulations.runner import simulate

pytestmark = pytest.mark.slow  # Flower simulation engine + Ray


def _cfg(tmp_path, tiny_bert, data, name, *extra):
    return tiny_run_config(
        tmp_path, tiny_bert, data, name,
        "partition.num_devices=12", "selection.devices_per_round=6", "server.rounds=3",
        "client.steps=5", "client.batch_size=16", "cohorts.clusters=0", *extra,
    )  # fmt: skip


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected_reason(faults: FaultInjector) -> str | None:
    """The failure the server must log for a device with these faults (first one wins)."""
    if faults.slow:
        return "no reply within server.round_timeout"
    if faults.crashes:
        return "raised: "
    if faults.malformed:
        return "malformed weights"
    if faults.nan:
        return "non-finite weights"
    if faults.nan_metric:
        return "non-finite metric train_loss"
    return None


def test_crashes_stragglers_and_garbage_are_dropped_logged_and_never_aggregated(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = _cfg(
        tmp_path, tiny_bert, intent_jsonl, "faulty",
        "faults.crash=0.15", "faults.nan=0.15", "faults.malformed=0.15", "faults.nan_metric=0.15",
        "faults.slow=0.1", "faults.slow_seconds=10", "server.round_timeout=6",
    )  # fmt: skip
    run_dir, summary = simulate(cfg)
    rows = _rows(run_dir)
    seen = set()
    for row in rows[1:]:
        logged = {f["device"]: f["reason"] for f in row["failures"]}
        for device in row["devices"]:
            expected = _expected_reason(FaultInjector(cfg.faults, 0, row["round"], device))
            if expected is None:
                assert device not in logged, (row["round"], device, logged.get(device))
            else:
                assert expected in logged[device], (row["round"], device, logged[device])
                seen.add(expected)
    assert len(seen) >= 4, seen  # the seed gives most kinds of fault in three rounds
    final = load_file(run_dir / "checkpoint" / "model.safetensors")
    assert all(np.isfinite(v).all() for v in final.values())
    assert np.isfinite(summary["final"]["loss"])
    assert summary["failures"] == sum(len(r.get("failures", [])) for r in rows)


def test_a_round_with_too_few_replies_is_retried_then_skipped_keeping_the_model(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = _cfg(
        tmp_path, tiny_bert, intent_jsonl, "strict",
        "selection.devices_per_round=4", "server.min_replies=4", "server.retries=1",
        "faults.crash=0.5", "server.rounds=4",
    )  # fmt: skip
    run_dir, _ = simulate(cfg)
    rows = _rows(run_dir)
    skipped = [r for r in rows[1:] if r.get("skipped")]
    assert skipped, "crash = 0.5 with 4 of 4 replies needed skips some round for this seed"
    for before, row in zip(rows, rows[1:]):
        if row.get("skipped"):  # two attempts (the second without the first's crashed devices)
            assert len({f["device"] for f in row["failures"]}) >= 2
            assert row["loss"] == pytest.approx(before["loss"], abs=1e-7)
        else:  # the attempt that counted had no crash
            crashed = [d for d in row["devices"]
                       if FaultInjector(cfg.faults, 0, row["round"], d).crashes]  # fmt: skip
            assert crashed == []


def test_a_federation_where_every_device_crashes_stops_with_one_line(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = _cfg(tmp_path, tiny_bert, intent_jsonl, "dead", "faults.crash=1.0", "server.rounds=1")
    with pytest.raises(FederationError, match="round 1: no usable reply in any attempt") as err:
        simulate(cfg)
    assert "simulated crash" in str(err.value) and "\n" not in str(err.value)


def test_a_robust_aggregation_keeps_the_accuracy_two_lying_devices_take_from_fedavg(
    tmp_path, tiny_bert, intent_jsonl
):
    """Devices 0 and 1 (of 12; 6 per round) send -10x their honest update every round."""
    attack = ("faults.byzantine=2", "faults.attack_scale=10", "server.malicious=1")
    accuracy = {}
    for name, extra in {
        "clean": ("server.aggregation=fedmedian",),
        "fedavg": attack,
        "fedmedian": (*attack, "server.aggregation=fedmedian"),
        "bounded": (*attack, "server.max_update_norm=1.0"),
    }.items():
        _, summary = simulate(_cfg(tmp_path, tiny_bert, intent_jsonl, name, *extra))
        accuracy[name] = summary["final"][summary["primary_metric"]]
    print("final accuracy, tiny intents, 2 of 12 devices sign-flipping x10:", accuracy)
    assert accuracy["fedmedian"] >= accuracy["clean"] - 0.1
    assert accuracy["fedmedian"] >= accuracy["fedavg"] + 0.2
    assert accuracy["bounded"] > accuracy["fedavg"]  # norm bounding alone limits the damage
