"""End to end: tiny real simulations through Flower's simulation engine with the Ray backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_runs import tiny_run_config

from fedtrust.simulations.runner import simulate

pytestmark = pytest.mark.slow  # Flower simulation engine + Ray


def _cfg(tmp_path, tiny_bert, data, name, *extra):
    return tiny_run_config(
        tmp_path,
        tiny_bert,
        data,
        name,
        "partition.num_devices=20",
        "selection.devices_per_round=4",
        "server.rounds=2",
        "client.steps=10",
        "client.batch_size=16",
        *extra,
    )


def test_tiny_simulation_writes_a_complete_report(tmp_path, tiny_bert, intent_jsonl):
    from transformers import AutoModelForSequenceClassification

    cfg = _cfg(tmp_path, tiny_bert, intent_jsonl, "plain", "server.rounds=3")
    run_dir, summary = simulate(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(len(r["devices"]) == 4 for r in rows[1:])
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05  # the federated model learned something
    assert summary["final"]["loss"] == pytest.approx(rows[-1]["loss"])  # eval subset = whole split
    for name in ("config.toml", "summary.json", "learning_curve.png", "model/model.safetensors"):
        assert (run_dir / name).is_file(), name
    cohorts = json.loads((run_dir / "cohorts.json").read_text())
    assert cohorts["source"] == "label mix"  # IID devices; the test split has no device ids
    assert cohorts["devices_scored"] == 20
    chosen = sum(
        c["selected_per_device"] * c["devices"] for c in cohorts["by"]["activity"]["cohorts"]
    )
    assert chosen == 3 * 4  # 3 rounds x 4 devices
    assert summary["cohorts"]["worst_gap"] == cohorts["worst_gap"]
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert set(model.config.id2label.values()) == {"alarm", "music", "weather"}


class Crash(Exception):
    pass


PLAIN = (
    "selection.strategy=activity",
    "devices.mode=continual",
    "devices.capacity=8",
    "server.aggregation=fedadam",
    "server.rounds=3",
    "server.server_lr=0.01",
)
# sample-level DP with reproducible noise: a resumed run is exact too (devices' budgets included)
PRIVATE = ("server.rounds=3", "privacy.target_epsilon=8", "privacy.reproducible_noise=true")


@pytest.mark.parametrize("extra", [PLAIN, PRIVATE], ids=["fedadam-activity", "sample-dp"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(
    tmp_path, tiny_bert, intent_jsonl, extra
):
    whole, _ = simulate(_cfg(tmp_path, tiny_bert, intent_jsonl, "whole", *extra))

    def crash_after_round_2(row):
        if row["round"] == 2:
            raise Crash("simulated crash")

    cfg = _cfg(tmp_path, tiny_bert, intent_jsonl, "stopped", *extra)
    with pytest.raises(Exception):  # noqa: B017 - Flower re-raises the ServerApp's exception
        simulate(cfg, on_round=crash_after_round_2)
    stopped = tmp_path / "stopped"
    assert json.loads((stopped / "checkpoint" / "round.json").read_text())["round"] == 2
    simulate(cfg, resume=stopped)

    a = load_file(whole / "checkpoint" / "model.safetensors")
    b = load_file(stopped / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
    # wall-clock timings, and the downlink's bytes: every message names the run folder (the
    # devices' storage), whose path is another here
    drop = {"seconds", "phases", "downlink_bytes"}
    rows_a = [
        {k: v for k, v in json.loads(x).items() if k not in drop}
        for x in (whole / "metrics.jsonl").read_text().splitlines()
    ]
    rows_b = [
        {k: v for k, v in json.loads(x).items() if k not in drop}
        for x in (stopped / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows_a == rows_b
