"""The cohort-fairness settings: validation, what the federation is built with, the sweep."""

import numpy as np
import pytest

from fedtrust.server.finetune import CohortFinetune
from fedtrust.server.qffl import SampledQFedAvg
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.reweighting import AdversarialReweighting
from fedtrust.simulations.compare import (
    comparison_figure,
    markdown_table,
    run_name,
    sweep_variants,
    variants,
)
from fedtrust.simulations.config import ConfigError, load_config, needs_device_losses
from fedtrust.simulations.federation import (
    WorstActivityCohort,
    device_instructions,
    make_selection,
    make_strategy,
)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["selection.floor=1.5"], "selection.floor: must be in [0, 1], got 1.5"),
        (["selection.beta_end=-2"], "selection.beta_end: must be >= 0 (or -1"),
        (["server.aggregation=qfedavg", "server.q=-1"], "server.q: must be >= 0, got -1.0"),
        (["mitigation.arw_bound=0.5"], "mitigation.arw_bound: must be >= 1, got 0.5"),
        (["mitigation.finetune_rounds=12"], "mitigation.finetune_rounds: must be in [0,"),
        (
            ["mitigation.reweighting=adversarial", "server.aggregation=qfedavg"],
            "cannot be combined with server.aggregation = 'qfedavg'",
        ),
        (
            ["mitigation.reweighting=adversarial", "privacy.noise_multiplier=1.0"],
            "mitigation.reweighting: 'adversarial' is not covered by the DP accountant",
        ),
        (
            ["server.aggregation=qfedavg", "privacy.target_epsilon=8"],
            "server.aggregation: 'qfedavg' is not covered by the DP accountant",
        ),
        (["cohorts.min_devices=1"], "cohorts.min_devices: must be >= 2, got 1"),
        (
            ["mitigation.finetune_rounds=2", "selection.weighting=inverse-probability"],
            "which selection.weighting = 'inverse-probability' divides out again",
        ),
        (
            ["mitigation.reweighting=adversarial", "audit.federated_rounds=3"],
            "audit.federated_rounds: 3 > 0 audits user-level DP runs",
        ),
        (["mitigation.reweighting=median"], "'median' is not one of 'none', 'adversarial'"),
    ],
)
def test_bad_fairness_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_strategy_gets_each_configured_mitigation(tmp_path):
    registry = DeviceRegistry()
    plain = load_config(None, [])
    assert not needs_device_losses(plain)
    strategy = make_strategy(plain, registry, 100)
    assert strategy.reweighting is None and strategy.finetune is None

    cfg = load_config(
        None,
        [
            "selection.strategy=activity",
            "selection.floor=0.3",
            "selection.beta_end=0.5",
            "mitigation.reweighting=adversarial",
            "mitigation.arw_bound=3",
            "mitigation.finetune_rounds=2",
        ],
    )
    selection = make_selection(cfg.selection)
    assert selection.floor == 0.3
    assert selection.at_round(cfg.server.rounds, cfg.server.rounds).beta == pytest.approx(0.5)
    strategy = make_strategy(cfg, registry, 100)
    assert isinstance(strategy.reweighting, AdversarialReweighting)
    assert strategy.reweighting.bound == 3
    assert isinstance(strategy.finetune, CohortFinetune) and strategy.finetune.rounds == 2
    record = device_instructions(cfg, tmp_path, 100)
    assert record["global-loss"] is True  # the loss-aware mitigations need device losses

    q = load_config(None, ["server.aggregation=qfedavg", "server.q=2"])
    strategy = make_strategy(q, registry, 100)
    assert isinstance(strategy, SampledQFedAvg) and strategy.q == 2
    assert strategy.client_learning_rate == q.client.lr


def test_the_server_finds_the_worst_activity_cohort_from_losses():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 200, size=120).astype(float)
    losses = np.where(counts <= 20, 3.0, 1.0) + rng.normal(0, 0.05, size=120)
    losses[rng.choice(120, 30, replace=False)] = np.nan  # never reported
    mask = WorstActivityCohort(min_devices=5)(counts, losses)
    assert mask.dtype == bool
    truth = counts <= 20
    assert (mask & truth).sum() / (mask | truth).sum() > 0.8  # Jaccard with the planted cohort
    # a failing majority is no cohort to up-weight: at most max_share of the devices
    losses = np.where(counts <= 150, 3.0, 1.0) + rng.normal(0, 0.05, size=120)
    lightest = WorstActivityCohort(5, max_share=0.25)(counts, losses)
    assert 0.15 <= lightest.mean() <= 0.25  # the worst range that small: the lightest devices
    assert counts[lightest].max() < np.median(counts)
    assert WorstActivityCohort(5, max_share=1.0)(counts, losses).mean() > 0.6


def test_fairness_sweep_runs_each_mitigation_on_each_data_setting():
    cfg = load_config("shakespeare", ["server.rounds=12"])
    names = list(sweep_variants("fairness", cfg))
    assert names[:2] == ["uniform", "activity"] and len(names) == 6
    runs = variants(cfg, "fairness", ("static", "continual"))
    assert len(runs) == 12
    floor = runs[("static", "activity + floor")]
    assert floor.selection.strategy == "activity" and floor.selection.floor == 0.5
    assert runs[("continual", "activity + q-FFL")].server.aggregation == "qfedavg"
    assert runs[("continual", "activity + q-FFL")].devices.mode == "continual"
    assert runs[("static", "activity + ARW")].mitigation.reweighting == "adversarial"
    finetune = runs[("static", "activity + floor + fine-tune")]
    assert finetune.mitigation.finetune_rounds == 2 and finetune.selection.floor == 0.5
    assert cfg.selection.strategy == "uniform" and cfg.mitigation.reweighting == "none"  # intact
    assert run_name("static", "activity + floor + fine-tune") == "static-activity-floor-fine-tune"
    selection_only = variants(cfg, "selection", ("static",))
    assert list(selection_only) == [("static", "uniform"), ("static", "activity")]


def test_comparison_table_shows_the_worst_discovered_cohort():
    row = {
        "data": "static",
        "selection": "activity + floor",
        "metric": "accuracy",
        "final": 0.3,
        "final_loss": 2.3,
        "mean_examples_per_round": 1000.0,
        "distinct_devices": 150,
        "lightest_accuracy": 0.25,
        "cohort_gap": 0.04,
        "lightest_never_selected": 0.2,
        "quartiles_never_selected": 0,
        "worst_cohort": "activity <= 6",
        "worst_cohort_accuracy": 0.21,
        "worst_cohort_gap": 0.07,
    }
    table = markdown_table([row])
    assert "| static | activity + floor | 0.3000 |" in table
    assert "| 20% | 0 | activity <= 6 | 0.2100 | 0.0700 |" in table


def test_comparison_figure_has_a_panel_per_mode_and_the_tradeoff_panel_for_sweeps():
    curves = {
        ("static", "uniform"): [{"round": 1, "accuracy": 0.1}, {"round": 2, "accuracy": 0.2}],
        ("static", "activity"): [{"round": 1, "accuracy": 0.15}, {"round": 2, "accuracy": 0.3}],
        ("continual", "uniform"): [{"round": 1, "accuracy": 0.12}],
    }
    plain = comparison_figure(curves, "accuracy")
    assert [ax.get_title() for ax in plain.axes] == [
        "static device data",
        "continual device data",
    ]
    assert [list(line.get_ydata()) for line in plain.axes[0].get_lines()] == [
        [0.1, 0.2],
        [0.15, 0.3],
    ]
    rows = [
        {"data": "static", "selection": "uniform", "final": 0.2, "cohort_gap": 0.04},
        {"data": "static", "selection": "activity", "final": 0.3, "cohort_gap": 0.05},
    ]
    fig = comparison_figure(curves, "accuracy", rows=rows)
    assert fig.axes[-1].get_title() == "accuracy vs fairness"
    points = [c.get_offsets().tolist()[0] for c in fig.axes[-1].collections]
    assert points == [[0.04, 0.2], [0.05, 0.3]]
