"""`fedtrust compare`: four tiny Shakespeare simulations and one report."""

import json
from pathlib import Path

import pytest

from fedtrust.simulations.compare import MODES, SELECTIONS, comparison_figure, run_compare
from fedtrust.simulations.config import load_config
from fedtrust.simulations.run_folder import read_metrics

pytestmark = pytest.mark.slow  # Flower simulation engine + Ray


def _tiny_shakespeare(tmp_path, name: str, rounds: int, *extra: str):
    return load_config(
        "shakespeare",
        [
            "task.lm_layers=1",
            "task.lm_width=16",
            "task.lm_heads=2",
            "task.max_length=32",
            f"server.rounds={rounds}",
            "client.steps=1",
            "client.num_cpus=1",
            "server.eval_examples=64",
            "selection.devices_per_round=5",
            f'run.output_dir="{tmp_path}"',
            f'run.name="{name}"',
            *extra,
        ],
    )


def test_compare_runs_all_four_settings_and_activity_picks_heavier_devices(tmp_path):
    cfg = _tiny_shakespeare(tmp_path, "cmp", 2)
    out_dir, rows = run_compare(cfg)
    assert {(r["data"], r["selection"]) for r in rows} == {
        (d, s) for d in ("static", "continual") for s in ("uniform", "activity")
    }
    assert json.loads((out_dir / "comparison.json").read_text()) == rows
    assert (out_dir / "comparison.png").is_file()
    curves = {
        (r["data"], r["selection"]): read_metrics(out_dir / f"{r['data']}-{r['selection']}")[1:]
        for r in rows
    }
    fig = comparison_figure(curves, "accuracy")
    for ax, mode in zip(fig.axes, MODES):  # each panel plots its runs' per-round accuracy
        for line, strategy in zip(ax.get_lines(), SELECTIONS):
            assert list(line.get_ydata()) == [m["accuracy"] for m in curves[(mode, strategy)]]
    assert "| static | activity |" in (out_dir / "comparison.md").read_text()
    by = {(r["data"], r["selection"]): r for r in rows}
    for r in rows:  # cohorts: Shakespeare's test rows carry the speaking role
        assert 0 <= r["lightest_never_selected"] <= 1 and r["cohort_gap"] >= 0
        cohorts = json.loads(
            (out_dir / f"{r['data']}-{r['selection']}" / "cohorts.json").read_text()
        )
        assert cohorts["source"] == "device test rows"
    for mode in ("static", "continual"):
        assert (
            by[(mode, "activity")]["mean_examples_per_round"]
            > 2 * by[(mode, "uniform")]["mean_examples_per_round"]
        )


def test_fairness_sweep_runs_every_mitigation_through_flower_and_ray(tmp_path):
    cfg = _tiny_shakespeare(tmp_path, "fair", 4, "cohorts.min_devices=3", "cohorts.clusters=2")
    out_dir, rows = run_compare(cfg, sweep="fairness", modes=("static",))
    assert [r["selection"] for r in rows] == [
        "uniform",
        "activity",
        "activity + floor",
        "activity + q-FFL",
        "activity + ARW",
        "activity + floor + fine-tune",
    ]
    history = {r["selection"]: read_metrics(Path(r["run_dir"]))[1:] for r in rows}
    assert all("adversary" in m for m in history["activity + ARW"])  # ARW weights, each round
    assert all("cohort_size" in m for m in history["activity + floor + fine-tune"][-1:])
    assert history["activity + q-FFL"][-1]["loss"] != history["activity"][-1]["loss"]
    for r in rows:
        assert r["quartiles_never_selected"] is not None
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert "discovered" in summary["cohorts"] and "worst_cluster" in summary["cohorts"]
    assert "| static | activity + ARW |" in (out_dir / "comparison.md").read_text()
