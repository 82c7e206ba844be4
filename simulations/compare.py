"""Uniform vs activity-based device selection, on static and on continual device data.

Four simulations on the same partition and seed; one table (Markdown + JSON) and one figure with
a panel per data setting.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .config import Config
from .report import write_report_files
from .run_folder import read_metrics
from .runner import simulate

SELECTIONS = ("uniform", "activity")
MODES = ("static", "continual")


def variants(cfg: Config) -> dict[tuple[str, str], Config]:
    out = {}
    for mode in MODES:
        for strategy in SELECTIONS:
            out[(mode, strategy)] = dataclasses.replace(
                cfg,
                devices=dataclasses.replace(cfg.devices, mode=mode),
                selection=dataclasses.replace(cfg.selection, strategy=strategy),
                run=dataclasses.replace(cfg.run),
            )
    return out


def run_compare(cfg: Config, on_round=None) -> tuple[Path, list[dict[str, Any]]]:
    name = cfg.run.name or datetime.now().strftime("compare-%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run.output_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for (mode, strategy), c in variants(cfg).items():
        c.run.output_dir, c.run.name = str(out_dir), f"{mode}-{strategy}"
        run_dir, summary = simulate(c, on_round=on_round)
        metric = summary["primary_metric"]
        history = [r for r in read_metrics(run_dir) if r["round"] > 0]
        curves[(mode, strategy)] = history
        seen = [sum(r["available"]) for r in history]
        rows.append(
            {
                "data": mode,
                "selection": strategy,
                "metric": metric,
                "final": summary["final"][metric],
                "final_loss": summary["final"]["loss"],
                "best_subset": max(r[metric] for r in history),
                "mean_examples_per_round": sum(seen) / len(seen),
                "distinct_devices": len({d for r in history for d in r["devices"]}),
                **_cohort_columns(summary.get("cohorts")),
                "run_dir": str(run_dir),
            }
        )
    figure = comparison_figure(curves, rows[0]["metric"])
    write_report_files(out_dir, "comparison", rows, markdown_table(rows), figure)
    return out_dir, rows


def _cohort_columns(cohorts: dict[str, Any] | None) -> dict[str, Any]:
    """The activity-cohort fairness figures of one run (see fedtrust.fairness.cohorts)."""
    if not cohorts or "activity" not in cohorts:
        return {"cohort_gap": None, "lightest_accuracy": None, "lightest_never_selected": None}
    activity = cohorts["activity"]
    names = [k for k in activity if k not in ("gap", "worst")]
    return {
        "cohort_gap": activity["gap"],
        "lightest_accuracy": activity[names[0]] if names else None,
        "lightest_never_selected": cohorts["lightest_cohort_never_selected"],
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| data | selection | final {m} (full test) | final loss | best {m} (subset) "
        "| examples / round | distinct devices | lightest-quartile accuracy "
        "| worst-cohort gap | lightest never selected |"
    ).format(m=rows[0]["metric"])
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['selection']} | {r['final']:.4f} | {r['final_loss']:.4f} "
            f"| {r['best_subset']:.4f} | {r['mean_examples_per_round']:.0f} "
            f"| {r['distinct_devices']} | {_fmt(r.get('lightest_accuracy'))} "
            f"| {_fmt(r.get('cohort_gap'))} | {_fmt(r.get('lightest_never_selected'), '.0%')} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def comparison_figure(curves: dict, metric: str) -> Figure:
    """One panel per data setting, one line per selection."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, len(MODES), sharey=True)
    for ax, mode in zip(axes, MODES):
        for strategy in SELECTIONS:
            rows = curves.get((mode, strategy), [])
            ax.plot(
                [r["round"] for r in rows],
                [r[metric] for r in rows],
                marker="o",
                ms=2,
                label=strategy,
            )
        ax.set_title(f"{mode} device data")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel(metric.replace("_", " ") + " (central test subset)")
    fig.tight_layout()
    return fig
