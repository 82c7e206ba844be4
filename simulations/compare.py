"""`fedtrust compare`: one sweep of federated runs on the same partition and seed, one report.

Sweeps (`--sweep`):
- `compression`: dense float32 updates against each `[compression]` method (top-k with error
  feedback, the learned sparse and hashed diffs, 8-bit quantisation): accuracy against bytes;
- `selection` (default): uniform vs activity-based selection;
- `fairness`: uniform, activity, and activity with each cohort-fairness mitigation (a selection
  floor, q-FFL, adversarial reweighting, a fine-tuning phase with EWC).
Each variant runs on static and on continual device data (`--modes`). One table (Markdown +
JSON) with accuracy and the cohort-fairness figures of every run, and one figure with a panel
per data setting.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .compression_report import (
    COMPRESSION_VARIANTS,
    bytes_figure,
    compression_table,
    traffic_columns,
    with_ratios,
)
from .config import Config, validate
from .config_files import apply
from .fairness_report import short_rule
from .report import write_report_files
from .run_folder import load_run_config, read_metrics
from .runner import simulate

MODES = ("static", "continual")
SELECTIONS = ("uniform", "activity")
DEFAULT_FLOOR = 0.5  # the fairness sweep's floor when the config sets none
FINETUNE_SHARE = 6  # the fairness sweep fine-tunes in the last rounds / FINETUNE_SHARE rounds


def sweep_variants(sweep: str, cfg: Config) -> dict[str, dict[str, dict[str, Any]]]:
    """{variant name: config overrides} of a sweep."""
    uniform = {"selection": {"strategy": "uniform"}}
    activity = {"selection": {"strategy": "activity"}}
    if sweep == "selection":
        return {"uniform": uniform, "activity": activity}
    if sweep == "compression":  # the config's own selection, every method
        return COMPRESSION_VARIANTS
    floor = {"selection": {"strategy": "activity", "floor": cfg.selection.floor or DEFAULT_FLOOR}}
    finetune = max(1, cfg.server.rounds // FINETUNE_SHARE)
    # q-FFL estimates L = 1 / lr for SGD devices; after AdamW steps that L makes its step
    # vanishingly small, so the sweep uses L = 1 there (unless the config sets one).
    qffl_lr = cfg.server.qffl_lr or (1.0 if cfg.client.optimizer == "adamw" else cfg.client.lr)
    return {
        "uniform": uniform,
        "activity": activity,
        "activity + floor": floor,
        "activity + q-FFL": activity | {"server": {"aggregation": "qfedavg", "qffl_lr": qffl_lr}},
        "activity + ARW": activity | {"mitigation": {"reweighting": "adversarial"}},
        "activity + floor + fine-tune": floor | {"mitigation": {"finetune_rounds": finetune}},
    }


SWEEPS = ("selection", "fairness", "compression")


def variants(
    cfg: Config, sweep: str = "selection", modes: tuple[str, ...] = MODES
) -> dict[tuple[str, str], Config]:
    """One validated config per (data mode, variant)."""
    out = {}
    for mode in modes:
        for name, overrides in sweep_variants(sweep, cfg).items():
            c = copy.deepcopy(cfg)
            apply(c, {"devices": {"mode": mode}} | overrides, f"compare --sweep {sweep}")
            validate(c)
            out[(mode, name)] = c
    return out


def run_compare(
    cfg: Config, on_round=None, sweep: str = "selection", modes: tuple[str, ...] = MODES
) -> tuple[Path, list[dict[str, Any]]]:
    name = cfg.run.name or datetime.now().strftime(f"compare-{sweep}-%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run.output_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for (mode, variant), c in variants(cfg, sweep, modes).items():
        c.run.output_dir, c.run.name = str(out_dir), run_name(mode, variant)
        run_dir, summary = finished_run(c) or simulate(c, on_round=on_round)
        metric = summary["primary_metric"]
        history = [r for r in read_metrics(run_dir) if r["round"] > 0]
        curves[(mode, variant)] = history
        seen = [sum(r["available"]) for r in history]
        rows.append(
            {
                "data": mode,
                "selection": variant,
                "metric": metric,
                "final": summary["final"][metric],
                "final_loss": summary["final"]["loss"],
                "best_subset": max(r[metric] for r in history),
                "mean_examples_per_round": sum(seen) / len(seen),
                "distinct_devices": len({d for r in history for d in r["devices"]}),
                **cohort_columns(summary.get("cohorts")),
                **traffic_columns(summary),
                "run_dir": str(run_dir),
            }
        )
    if sweep == "compression":
        rows = with_ratios(rows)
        figure = bytes_figure(curves, rows, rows[0]["metric"])
        write_report_files(out_dir, "comparison", rows, compression_table(rows), figure)
        return out_dir, rows
    figure = comparison_figure(
        curves, rows[0]["metric"], modes, rows if sweep != "selection" else None
    )
    write_report_files(out_dir, "comparison", rows, markdown_table(rows), figure)
    return out_dir, rows


def finished_run(cfg: Config) -> tuple[Path, dict[str, Any]] | None:
    """The run folder and summary of a sweep's run that already finished with this very
    config (a sweep run again with the same name does only what is missing)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    summary = run_dir / "summary.json"
    if not summary.exists() or load_run_config(run_dir).to_dict() != cfg.to_dict():
        return None
    return run_dir, json.loads(summary.read_text())


def run_name(mode: str, variant: str) -> str:
    """The run folder of one variant: `static-activity-floor`, ..."""
    return f"{mode}-" + re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")


def cohort_columns(cohorts: dict[str, Any] | None) -> dict[str, Any]:
    """The cohort-fairness figures of one run's summary (see `cohort_summary`)."""
    if not cohorts or "activity" not in cohorts:
        return {
            "cohort_gap": None,
            "lightest_accuracy": None,
            "lightest_never_selected": None,
            "quartiles_never_selected": None,
            "worst_cohort": None,
            "worst_cohort_accuracy": None,
            "worst_cohort_gap": None,
        }
    activity = cohorts["activity"]
    worst = cohorts.get("discovered") or {}
    return {
        "cohort_gap": activity["gap"],
        "lightest_accuracy": activity["lightest"],
        "lightest_never_selected": cohorts["lightest_cohort_never_selected"],
        "quartiles_never_selected": cohorts["quartiles_never_selected"],
        "worst_cohort": worst.get("rule"),
        "worst_cohort_accuracy": worst.get("accuracy"),
        "worst_cohort_gap": worst.get("gap"),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| data | variant | final {m} (full test) | final loss | examples / round "
        "| distinct devices | lightest-quartile accuracy | activity-cohort gap "
        "| lightest never selected | quartiles never selected | worst discovered cohort "
        "| its accuracy | its gap |"
    ).format(m=rows[0]["metric"])
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['selection']} | {r['final']:.4f} | {r['final_loss']:.4f} "
            f"| {r['mean_examples_per_round']:.0f} | {r['distinct_devices']} "
            f"| {_fmt(r.get('lightest_accuracy'))} | {_fmt(r.get('cohort_gap'))} "
            f"| {_fmt(r.get('lightest_never_selected'), '.0%')} "
            f"| {_fmt(r.get('quartiles_never_selected'), 'd')} "
            f"| {short_rule(r['worst_cohort']) if r.get('worst_cohort') else 'n/a'} "
            f"| {_fmt(r.get('worst_cohort_accuracy'))} | {_fmt(r.get('worst_cohort_gap'))} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def comparison_figure(
    curves: dict,
    metric: str,
    modes: tuple[str, ...] = MODES,
    rows: list[dict[str, Any]] | None = None,
) -> Figure:
    """One panel per data setting, one line per variant (in the order they ran); with `rows`,
    a last panel of final accuracy against the activity-cohort gap of every run."""
    panels = len(modes) + (rows is not None)
    fig = Figure(figsize=(5.5 * panels + 0.5, 4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        for (run_mode, variant), history in curves.items():
            if run_mode != mode:
                continue
            ax.plot(
                [r["round"] for r in history],
                [r[metric] for r in history],
                marker="o",
                ms=2,
                label=variant,
            )
        ax.set_title(f"{mode} device data")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(metric.replace("_", " ") + " (central test subset)")
    if rows is not None:
        _tradeoff_panel(axes[-1], rows, metric)
    fig.tight_layout()
    return fig


def _tradeoff_panel(ax, rows: list[dict[str, Any]], metric: str) -> None:
    """Final accuracy (up is better) against the worst-cohort gap (left is fairer)."""
    markers = dict(zip(MODES, ("o", "s")))
    for r in rows:
        if r.get("cohort_gap") is None:
            continue
        ax.scatter(r["cohort_gap"], r["final"], marker=markers.get(r["data"], "o"))
        ax.annotate(f"{r['selection']} ({r['data']})", (r["cohort_gap"], r["final"]), fontsize=7)
    ax.set_xlabel("activity-cohort gap (best - worst quartile)")
    ax.set_ylabel(f"final {metric.replace('_', ' ')} (full test)")
    ax.set_title("accuracy vs fairness")
    ax.grid(alpha=0.3)
