"""The audit report on a hand-made audit (no training): tables, Markdown, HTML and the plots'
data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtrust.privacy.attacks.membership import membership_inference
from fedtrust.privacy.attacks.metrics import roc_points
from fedtrust.simulations.audit_report import (
    audit_markdown,
    audit_table,
    leakage_figure,
    plot_roc,
    roc_figure,
    write_audit_report,
)


def _curves() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    member = np.arange(1000) < 500
    return {
        "strong": roc_points(rng.normal(size=1000) + 2 * member, member),
        "weak": roc_points(rng.normal(size=1000) + 0.2 * member, member),
    }


def test_roc_figure_draws_every_curve_over_the_chance_line():
    curves = _curves()
    ax = roc_figure(curves, title="test").axes[0]
    chance, *lines = ax.get_lines()
    assert [line.get_label().split(" (AUC")[0] for line in lines] == ["strong", "weak"]
    for line, (fpr, tpr) in zip(lines, curves.values()):
        np.testing.assert_array_equal(line.get_xdata(), fpr)
        np.testing.assert_array_equal(line.get_ydata(), tpr)
    # the smallest positive FPR is 1/500, so the axes start at 1e-3
    assert list(chance.get_xdata()) == list(chance.get_ydata()) == [1e-3, 1]
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_title() == "test"
    assert float(lines[0].get_label()[-6:-1]) > float(lines[1].get_label()[-6:-1])  # AUCs
    with pytest.raises(ValueError, match="at least one curve"):
        roc_figure({})


def test_plot_roc_writes_a_png_in_a_new_folder(tmp_path):
    path = plot_roc(_curves(), tmp_path / "plots" / "roc.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _report() -> dict:
    """Two privacy levels attacked on synthetic scores, one canary each."""
    rng = np.random.default_rng(0)
    member = np.arange(200) < 100
    levels = []
    for label, eps, shift, exact in (("no DP", None, 2.0, True), ("ε = 4", 3.9, 0.1, False)):
        loss = rng.normal(size=200) - shift * member
        mia = membership_inference({"loss": loss, "confidence": -loss}, member)
        canary = {
            "text": "my pin code is 1 2 3 4",
            "repetitions": 3,
            "extracted": "1 2 3 4" if exact else "1 2 9 9",
            "exact": exact,
            "token_accuracy": 1.0 if exact else 0.5,
            "exposure": 8.0 if exact else 1.0,
        }
        levels.append(
            {
                "label": label,
                "achieved_epsilon": eps,
                "delta": None if eps is None else 1e-5,
                "relation": None if eps is None else "replace-one example",
                "accountant": None if eps is None else "pld",
                "test": {"accuracy": 0.9 if eps is None else 0.8},
                "mia": mia,
                "one_run": {"input_space": {"audited_epsilon_lower_bound": 0.5}, "white_box": None},
                "canaries": [canary],
                "canary_summary": {"3": {"exact_rate": float(exact)}},
            }
        )
    return {
        "dataset": "intents.jsonl",
        "model": "tiny",
        "primary_metric": "accuracy",
        "pool": 200,
        "members": 100,
        "non_members": 100,
        "shadows": 0,
        "epochs": 1,
        "canaries": [{"prefix": "my pin code is", "secret": "1 2 3 4"}],
        "levels": levels,
        "federated": [],
    }


def test_leakage_figure_plots_each_level():
    report = _report()
    loss_auc, tpr, utility = leakage_figure(report).axes
    auc_line, chance = loss_auc.get_lines()  # only the loss attack ran (no shadows)
    assert list(chance.get_ydata()) == [0.5, 0.5]
    assert list(auc_line.get_ydata()) == [lv["mia"]["loss"]["auc"] for lv in report["levels"]]
    mia_tpr, canary_exact = tpr.get_lines()
    assert list(mia_tpr.get_ydata()) == [
        lv["mia"]["loss"]["tpr_at_1pct_fpr"] for lv in report["levels"]
    ]
    assert list(canary_exact.get_ydata()) == [1.0, 0.0]
    assert list(utility.get_lines()[0].get_ydata()) == [0.9, 0.8]
    assert [t.get_text() for t in utility.get_xticklabels()] == ["no DP", "ε = 4"]


def test_report_files_hold_the_table_and_both_plots(tmp_path):
    report = _report()
    paths = write_audit_report(report, tmp_path)
    head, rows = audit_table(json.loads(paths["json"].read_text()))
    assert head[:5] == ["level", "ε achieved", "δ", "neighbours, accountant", "test accuracy"]
    assert [r[0] for r in rows] == ["no DP", "ε = 4"]
    assert rows[0][1:4] == ["∞", "–", "–"] and rows[1][1:4] == [
        "3.90",
        "1e-05",
        "replace-one example, pld",
    ]
    saved = json.loads(paths["json"].read_text())
    roc = saved["levels"][0]["mia"]["loss"]["roc"]
    assert len(roc["fpr"]) == len(roc["tpr"]) <= 200  # thinned to plain lists
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    markdown = paths["md"].read_text()
    assert markdown == audit_markdown(saved)
    assert "| ε = 4 | my pin code is 1 2 3 4 | 3 | 1 2 9 9 (50% of tokens) | 1.00 |" in markdown
