"""Differential privacy in federated and centralized training, end to end on tiny models."""

from __future__ import annotations

import json

import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant
from tiny_runs import tiny_run_config

from fedtrust.clients.budget import STATE_DIR, BudgetStore
from fedtrust.privacy.accounting import compute_epsilon, default_delta
from fedtrust.simulations.centralized import train_centralized
from fedtrust.simulations.runner import simulate

pytestmark = pytest.mark.slow  # Flower simulation engine + Ray


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
    for device, report in per_device.items():
        assert report["participations"] == 1
        assert 3.0 < report["epsilon"] <= 4.0 + 1e-6
        assert report["relation"] == "replace-one example" and report["accountant"] == "pld"
        assert 0 < report["delta"] <= 1e-5
        own = BudgetStore(run_dir / STATE_DIR).load(int(device))  # the device's own record
        assert len(own.history()) == 1 and own.history()[0][0] > 0  # one release, real noise
        assert compute_epsilon(own.history(), report["delta"], "pld", "replace-one") == (
            pytest.approx(report["epsilon"], rel=3e-3)
        )
    assert max(d["epsilon"] for d in per_device.values()) == pytest.approx(rows[-1]["epsilon"])
    assert rows[-1]["devices_out_of_budget"] == 9
    assert rows[-1]["relation"] == "replace-one example" and "train_loss" not in rows[-1]
    chosen = [d for r in rows for d in r["devices"]]
    assert len(chosen) == len(set(chosen))  # a device out of budget is never chosen again
    assert summary["privacy"]["level"] == "sample"
    assert summary["privacy"]["delta"] == rows[-1]["delta"]


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
    # an independent accountant (dp_accounting's PLD) on the Poisson-sampled Gaussian
    pld = PLDAccountant()
    event = PoissonSampledDpEvent(3 / 10, GaussianDpEvent(sigma))
    pld.compose(SelfComposedDpEvent(event, 3))
    assert eps[-1] == pytest.approx(pld.get_epsilon(default_delta(10)), rel=5e-3)
    assert rows[-1]["relation"] == "add/remove one device" and rows[-1]["delta"] == 1e-5
    assert "devices" not in rows[-1] and "train_loss" not in rows[-1]  # nothing per device
    assert summary["privacy"]["epsilon"] == pytest.approx(eps[-1])


def test_one_run_audit_with_canary_devices_inside_user_level_dp(tmp_path, tiny_bert, intent_jsonl):
    cfg = _cfg(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "user-audit",
        "privacy.level=user",
        "privacy.target_epsilon=5.0",
        "privacy.audit_canaries=1000",
    )
    run_dir, summary = simulate(cfg)
    audit = summary["privacy"]["audit"]
    assert audit["canaries"] == 1000 and audit["method"].endswith("canary devices")
    assert audit["claimed_epsilon"] == pytest.approx(summary["privacy"]["epsilon"])
    assert 0 <= audit["audited_epsilon_lower_bound"] <= audit["claimed_epsilon"]
    assert audit["passed"]


def test_centralized_training_with_a_target_epsilon(tmp_path, tiny_bert, intent_jsonl):
    cfg = _cfg(tmp_path, tiny_bert, intent_jsonl, "central", "privacy.target_epsilon=3.0")
    run_dir, summary = train_centralized(cfg, epochs=2)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["epsilon"] < rows[2]["epsilon"] <= 3.0 + 1e-6
    assert rows[2]["epsilon"] > 2.5  # the calibrated noise spends (almost) the whole budget
    assert summary["privacy"]["epsilon"] == pytest.approx(rows[2]["epsilon"])
    assert summary["privacy"]["relation"] == "replace-one example"
    assert "train_loss" not in rows[2]  # under DP the training loss is not released


def test_one_run_audit_inside_training_passes_real_dp_and_costs_little(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = _cfg(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "audited",
        "privacy.target_epsilon=4.0",
        "privacy.audit_canaries=500",
    )
    _, summary = train_centralized(cfg, epochs=2)
    audit = summary["privacy"]["audit"]
    assert audit["canaries"] == 500 and audit["claimed_epsilon"] == summary["privacy"]["epsilon"]
    assert 0 <= audit["audited_epsilon_lower_bound"] <= audit["claimed_epsilon"]
    assert audit["passed"] and audit["guesses"] > 0
