"""The privacy audit end to end on a tiny model, and single attacks on existing runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tiny_runs import tiny_run_config

from fedtrust.errors import ConfigError, RunFolderError
from fedtrust.simulations.audit import attack_run, run_audit
from fedtrust.simulations.centralized import train_centralized
from fedtrust.simulations.config import load_config
from fedtrust.simulations.population import build_population


@pytest.fixture(scope="module")
def varied_jsonl(tmp_path_factory):
    """200 distinct 5-word utterances with random intents (membership is all there is to learn)."""
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta rain sun song play wake clock tiger lemon".split()
    path = tmp_path_factory.mktemp("varied") / "varied.jsonl"
    with path.open("w") as f:
        for i in range(200):
            text = " ".join(rng.choice(words, 5)) + f" {i}"
            f.write(json.dumps({"text": text, "label": str(rng.choice(["a", "b", "c"]))}) + "\n")
    return path


def _audit_cfg(tmp_path, tiny_bert, data, *extra):
    return tiny_run_config(
        tmp_path,
        tiny_bert,
        data,
        "audit",
        "audit.examples=60",
        "audit.epochs=3",
        "audit.shadows=2",
        "audit.epsilons=[0, 4]",
        "audit.canary_repetitions=[3]",
        "audit.canaries_per_level=1",
        "audit.canary_candidates=50",
        "audit.extraction_steps=5",
        "audit.eval_examples=30",
        "client.batch_size=16",
        *extra,
    )


def test_audit_writes_one_report_with_every_level(tmp_path, tiny_bert, varied_jsonl):
    cfg = _audit_cfg(tmp_path, tiny_bert, varied_jsonl)
    out, report = run_audit(cfg)
    assert [lv["label"] for lv in report["levels"]] == ["no DP", "ε = 4"]
    # each pool example is a member by coin flip (the one-run audit's input-space canaries)
    assert report["members"] + report["non_members"] == 60 and 15 < report["members"] < 45
    no_dp, dp = report["levels"]
    assert no_dp["achieved_epsilon"] is None
    assert 0 < dp["achieved_epsilon"] <= 4.0 + 1e-6
    # claimed ε against the one-run audit: the DP level passes both audits
    assert no_dp["one_run"]["white_box"] is None  # no DP-SGD, no gradient canaries
    for kind in ("input_space", "white_box"):
        audited = dp["one_run"][kind]
        assert audited["claimed_epsilon"] == pytest.approx(dp["achieved_epsilon"])
        assert 0 <= audited["audited_epsilon_lower_bound"] <= dp["achieved_epsilon"]
    assert dp["one_run"]["white_box"]["canaries"] == cfg.audit.one_run_canaries
    assert set(no_dp["mia"]) == {"loss", "reference", "lira_offline", "lira_online"}
    assert all(0 <= m["auc"] <= 1 for m in no_dp["mia"].values())
    assert len(no_dp["canaries"]) == 1 and no_dp["canaries"][0]["repetitions"] == 3
    saved = json.loads((out / "audit.json").read_text())
    assert saved["levels"][1]["mia"]["loss"]["auc"] == pytest.approx(dp["mia"]["loss"]["auc"])
    page = (out / "audit.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    markdown = (out / "audit.md").read_text()
    assert "| ε = 4 |" in markdown and "audited ε ≥ (white-box)" in markdown
    assert "replace-one example, pld" in markdown
    # a second run in the same folder reuses every trained model
    _, again = run_audit(cfg)
    assert again["levels"][0]["test"] == no_dp["test"]


@pytest.mark.slow  # Flower simulation engine + Ray
def test_audit_of_federated_user_level_dp_with_canary_devices(tmp_path, tiny_bert, varied_jsonl):
    cfg = _audit_cfg(
        tmp_path,
        tiny_bert,
        varied_jsonl,
        "audit.shadows=0",
        "audit.canaries_per_level=0",
        "audit.federated_rounds=2",
        "partition.num_devices=6",
        "selection.devices_per_round=2",
        "client.epochs=1",
    )
    out, report = run_audit(cfg)
    (federated,) = report["federated"]
    assert federated["label"] == "user-level ε = 4"
    assert federated["privacy"]["relation"] == "add/remove one device"
    audited = federated["one_run"]
    assert audited["canaries"] == cfg.audit.one_run_canaries
    assert 0 <= audited["audited_epsilon_lower_bound"] <= audited["claimed_epsilon"] <= 4 + 1e-6
    assert "## Federated: user-level DP-FedAvg" in (out / "audit.md").read_text()


def test_attack_on_a_finished_run(tmp_path, tiny_bert, varied_jsonl):
    cfg = tiny_run_config(
        tmp_path, tiny_bert, varied_jsonl, "central", "client.batch_size=16", "server.rounds=1"
    )
    run_dir, _ = train_centralized(cfg, epochs=1)
    out, report = attack_run(run_dir, "mia", examples=60)
    assert report["members"] == report["non_members"] == 20  # the 10% test split
    assert (out / "mia.json").is_file() and (out / "mia_roc.png").is_file()
    assert json.loads((out / "mia.json").read_text())["auc"] == pytest.approx(report["auc"])
    with pytest.raises(RunFolderError, match="planted no canaries"):
        attack_run(run_dir, "canary")
    with pytest.raises(ConfigError, match="unknown attack 'lira'"):
        attack_run(run_dir, "lira")


def test_attack_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "fedtrust.simulations.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    (tmp_path / "config.toml").write_text("[task]\n[run]\n")
    result = run("attack", "mia", "--model", str(tmp_path))
    assert result.returncode == 2
    assert "no trained model (model/config.json missing" in " ".join(result.stdout.split())
    result = run("audit", "--set", "audit.canary_repetitions=[0, 5]")
    assert result.returncode == 2
    assert "audit.canary_repetitions: every repetition count must be >= 1" in " ".join(
        result.stdout.split()
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_planted_canaries_sit_on_one_device_and_decoys_on_the_others(tiny_bert, intent_jsonl):
    cfg = load_config(
        None,
        [
            f'task.dataset="{intent_jsonl}"',
            f'task.model="{tiny_bert}"',
            "partition.num_devices=10",
            "audit.plant_canaries=true",
            "audit.canary_device=3",
            "audit.canary_repetitions=[4]",
            "audit.canaries_per_level=2",
            "audit.canary_decoys=9",
        ],
    )
    population = build_population(cfg)
    train = population.task.train
    holders = {
        d: [train[i]["canary"] for i in part if "canary" in train[i]]
        for d, part in enumerate(population.parts)
    }
    assert sorted(holders[3]) == [0] * 4 + [1] * 4  # both canaries, 4 times each, one device
    decoys = [c for d, found in holders.items() if d != 3 for c in found]
    assert decoys == [-1] * 18  # 9 per prefix (2 templates), on the other devices
    assert {d for d, found in holders.items() if found and d != 3} == set(range(10)) - {3}
