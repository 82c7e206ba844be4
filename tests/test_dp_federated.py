"""Differential privacy in federated and centralized training, end to end on tiny models."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant
from tiny_runs import tiny_run_config

from fedtrust.simulations.centralized import train_centralized
from fedtrust.simulations.runner import simulate


def _cfg(tmp_path, tiny_bert, data, name, *extra):
    return tiny_run_config(
        tmp_path,
        tiny_bert,
        data,
        name,
        "partition.num_devices=10",
        "selection.devices_per_round=3",
        "server.rounds=3",
        "client.epochs=1",
        "client.batch_size=8",
        *extra,
    )


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sample_level_dp_reports_each_devices_epsilon_within_budget(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = _cfg(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "sample",
        "privacy.target_epsilon=4.0",
        "privacy.participations=1",
    )
    run_dir, summary = simulate(cfg)
    rows = _rows(run_dir)[1:]
    per_device = json.loads((run_dir / "device_privacy.json").read_text())
    assert len(per_device) == 9  # 3 rounds x 3 devices, each device at most once (budget: 1)
    for device in per_device.values():
        assert device["participations"] == 1
        assert 3.0 < device["epsilon"] <= 4.0 + 1e-6
        history = device["history"]
        assert len(history) == 1 and history[0][0] > 0  # one participation, real noise
    assert max(d["epsilon"] for d in per_device.values()) == pytest.approx(rows[-1]["epsilon"])
    assert rows[-1]["devices_out_of_budget"] == 9
    chosen = [d for r in rows for d in r["devices"]]
    assert len(chosen) == len(set(chosen))  # a device out of budget is never chosen again
    assert summary["privacy"]["level"] == "sample"


def test_user_level_dp_fedavg_accounts_with_the_device_sampling_rate(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = _cfg(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "user",
        "privacy.level=user",
        "privacy.target_epsilon=5.0",
        "privacy.max_grad_norm=0.5",
    )
    run_dir, summary = simulate(cfg)
    rows = _rows(run_dir)[1:]
    eps = [r["epsilon"] for r in rows]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(5.0, abs=0.1)
    sigma = rows[-1]["noise_multiplier"]
    accountant = RDPAccountant()
    accountant.history = [(sigma, 3 / 10, 3)]
    assert eps[-1] == pytest.approx(accountant.get_epsilon(delta=1 / 100), rel=1e-6)
    assert summary["privacy"]["epsilon"] == pytest.approx(eps[-1])


def test_centralized_training_with_a_target_epsilon(tmp_path, tiny_bert, intent_jsonl):
    cfg = _cfg(tmp_path, tiny_bert, intent_jsonl, "central", "privacy.target_epsilon=3.0")
    run_dir, summary = train_centralized(cfg, epochs=2)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["epsilon"] < rows[2]["epsilon"] <= 3.0 + 1e-6
    assert rows[2]["epsilon"] > 2.5  # the calibrated noise spends (almost) the whole budget
    assert summary["privacy"]["epsilon"] == pytest.approx(rows[2]["epsilon"])
