"""Fairness reports: the prediction-sensitivity audit (sensitivity.json/.md/.png) and the
per-cohort accuracy of a federated run (cohorts.json/.md/.png).

The figures are drawn on `matplotlib.figure.Figure` objects (no pyplot, no backend switch), so
writing a report never changes the user's matplotlib state; the `*_figure` functions return the
figure for a caller (or a test) to inspect.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fedtrust.errors import FairnessError, RunFolderError
from fedtrust.fairness.sensitivity import FORMULA, REFERENCE

from .report import write_report_files

TOP_EXAMPLES = 5


def report_folder(path: Path | str) -> Path:
    """Create the report folder; a RunFolderError naming it when that is impossible."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"{out}: cannot create the report folder ({err})") from None
    return out


def write_report(out_dir: Path | str, result: dict[str, Any], title: str) -> Path:
    """Write the three report files for `result` (one or more audited models under "models",
    each as from `sensitivity.audit`; other keys are copied to the JSON). Returns out_dir."""
    models = result.get("models") or []
    if not models:
        raise FairnessError("nothing to report: no audited model")
    out = report_folder(out_dir)
    metric = {"formula": FORMULA, "reference": REFERENCE}
    return write_report_files(
        out,
        "sensitivity",
        {"title": title, "metric": metric, **result},
        _markdown(result, title),
        sensitivity_figure(models, title),
        dpi=110,
        default=_jsonable,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def _markdown(result: dict[str, Any], title: str) -> str:
    models = result["models"]
    lines = [f"# {title}", ""]
    lines += [
        "Accumulated prediction sensitivity (APS, Krishna et al., ACL 2022): mean over examples of",
        "v^T |J_f(x)| w(x), the task classifier's probability gradients in the token embeddings",
        "weighted by the protected-status model's normalised gradient magnitudes. Counterfactual",
        "gap: mean |Δp| of the predicted class when the person's gender is swapped, and how often",
        "the predicted class flips. Lower is fairer for both.",
        "",
    ]
    columns = sorted({c for m in models for c in m["sensitivity"]["groups"]})
    groups = [(c, g) for c in columns for g in _group_names(models, c)]
    header = ["model", "examples", "accuracy", "APS"]
    header += [f"APS {g or '(none)'}" for _, g in groups]
    header += [f"APS disparity ({c})" for c in columns]
    header += ["CF mean abs Δp", "CF flip rate", "Spearman(PS, abs Δp)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        s = m["sensitivity"]
        row = [m["name"], str(m["examples_measured"]), _f(m.get("accuracy")), _f(s["overall"])]
        row += [_f(s["groups"].get(c, {}).get(g)) for c, g in groups]
        row += [_f(s["disparity"].get(c)) for c in columns]
        cf = m["counterfactual"]
        row += [_f(cf["mean_abs_delta"]), _f(cf["flip_rate"], 3)]
        row += [_f(m.get("spearman_sensitivity_vs_delta"), 3)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if "psm" in result:
        psm = result["psm"]
        lines += ["Protected-status model: " + ", ".join(f"{k} {_f(v)}" for k, v in psm.items())]
        lines.append("")
    for m in models:
        top = sorted(m.get("examples", []), key=lambda e: -e["sensitivity"])[:TOP_EXAMPLES]
        if not top:
            continue
        lines += [f"## {m['name']}: the {len(top)} most sensitive examples", ""]
        lines += ["| text | counterfactual | PS | abs Δp | flipped |", "|---|---|---|---|---|"]
        for e in top:
            lines.append(
                f"| {e['text']} | {e['swapped']} | {_f(e['sensitivity'])} | {_f(e['delta'])} "
                f"| {'yes' if e['flipped'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def _group_names(models: list[dict[str, Any]], column: str) -> list[str]:
    names: dict[str, None] = {}
    for m in models:
        names.update(dict.fromkeys(m["sensitivity"]["groups"].get(column, {})))
    return sorted(names)


def sensitivity_figure(models: list[dict[str, Any]], title: str) -> Figure:
    """Per-group APS (left) and the counterfactual gap (right), one bar colour per model."""
    columns = sorted({c for m in models for c in m["sensitivity"]["groups"]})
    labels = ["all"] + [f"{c}={g}" for c in columns for g in _group_names(models, c)]
    keys = [None] + [(c, g) for c in columns for g in _group_names(models, c)]
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2, width_ratios=[2, 1])
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        s = m["sensitivity"]
        values = [
            s["overall"] if k is None else s["groups"].get(k[0], {}).get(k[1], np.nan) for k in keys
        ]
        left.bar(np.arange(len(keys)) + i * width, values, width, label=m["name"])
        cf = m["counterfactual"]
        right.bar(
            np.arange(2) + i * width,
            [cf["mean_abs_delta"], cf["flip_rate"]],
            width,
            label=m["name"],
        )
    left.set_xticks(np.arange(len(keys)) + width * (len(models) - 1) / 2)
    left.set_xticklabels(labels, rotation=20, ha="right")
    left.set_ylabel("accumulated prediction sensitivity")
    left.set_title("APS per group")
    right.set_xticks(np.arange(2) + width * (len(models) - 1) / 2)
    right.set_xticklabels(["mean |Δp|", "flip rate"])
    right.set_title("counterfactual gap")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    if len(models) > 1:
        left.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- cohorts


def write_cohort_report(report: dict[str, Any], out_dir: Path, metric: str = "accuracy") -> None:
    """cohorts.json, cohorts.md and cohorts.png in `out_dir` (a `cohorts.cohort_report`)."""
    write_report_files(
        out_dir, "cohorts", report, cohort_markdown(report, metric), cohort_figure(report, metric)
    )


def cohort_markdown(report: dict[str, Any], metric: str = "accuracy") -> str:
    """One table of mean device accuracy, selections and never-selected share per grouping."""
    lines = [
        f"Per-device {metric} measured by {report['source']} "
        f"({report['devices_scored']} of {report['devices']} devices scored, "
        f"{report['rounds']} rounds).",
        "",
    ]
    found = report.get("discovered", {}).get("cohorts", [])
    if "discovered" in report and not found:
        lines += ["**Worst discovered cohort: none** (no split of the devices' attributes leaves "
                  "enough scored devices on both sides with a lower accuracy).", ""]  # fmt: skip
    if found:
        w = found[0]
        lines += [
            f"**Worst discovered cohort: {short_rule(w['rule'])}** — {w['devices']} devices "
            f"({w['device_share']:.0%}), mean device accuracy {_ci(w)} vs {w['rest_accuracy']:.4f} "
            f"for the rest (gap {w['gap']:.4f}).",
            "",
        ]
    for by, table in report["by"].items():
        gap = "n/a" if table["gap"] is None else f"{table['gap']:.4f}"
        lines += [
            f"### by {by} (worst cohort: {table['worst']}, gap {gap})",
            "",
            "| cohort | devices | mean device accuracy | selected / device | never selected |",
            "|---|---|---|---|---|",
        ]
        for r in table["cohorts"]:
            acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
            lines.append(
                f"| {r['cohort']} | {r['devices']} | {acc} | {r['selected_per_device']:.2f} "
                f"| {r['never_selected']:.0%} |"
            )
        lines.append("")
    return "\n".join(lines + discovered_markdown(report))


def discovered_markdown(report: dict[str, Any]) -> list[str]:
    """The discovered cohorts and embedding clusters of a report, as Markdown lines."""
    lines: list[str] = []
    if "discovered" in report:
        found = report["discovered"]
        share = found["bottom_share"]
        lines += [
            f"### discovered cohorts (splits over {', '.join(found['attributes'])})",
            "",
            "Worst first; 95 % bootstrap intervals over devices. Bottom-cohort share: "
            f"{share['device_share']:.0%} of devices, {share['example_share']:.0%} of examples.",
            "",
            *[f"Note: {note}." for note in found.get("notes", [])],
            *([""] if found.get("notes") else []),
            "| cohort | devices | examples | mean device accuracy [95 % CI] | rest | gap | note |",
            "|---|---|---|---|---|---|---|",
        ]
        if not found["cohorts"]:
            lines.append("| no split with enough devices on both sides | | | | | | |")
        for c in found["cohorts"]:
            lines.append(
                f"| {short_rule(c['rule'])} | {c['devices']} ({c['device_share']:.0%}) "
                f"| {c['examples']} ({c['example_share']:.0%}) | {_ci(c)} "
                f"| {c['rest_accuracy']:.4f} | {c['gap']:.4f} "
                f"| {_uncertain(c)} |"
            )
        lines.append("")
    if report.get("clusters"):
        lines += [
            "### embedding clusters of held-out examples (k-means, worst first)",
            "",
            "| cluster | examples | accuracy [95 % CI] | typical examples |",
            "|---|---|---|---|",
        ]
        for c in report["clusters"]:
            texts = " · ".join(t.replace("|", "/").replace("\n", " ")[:60] for t in c["examples"])
            note = " (too small)" if c["too_small"] else ""
            lines.append(f"| {c['cluster']} | {c['size']}{note} | {_ci(c)} | {texts} |")
        lines.append("")
    return lines


def short_rule(rule: str, values: int = 4) -> str:
    """A cohort rule for a table cell: long value sets cut to their first `values` (the full
    rule stays in the JSON), no `|` to break the table."""

    def cut(match: re.Match) -> str:
        items = match.group(1).split(", ")
        if len(items) <= values:
            return match.group(0)
        return "{" + ", ".join(items[:values]) + f", … +{len(items) - values} more}}"

    return re.sub(r"\{([^}]*)\}", cut, rule).replace("|", "/")


def _uncertain(cohort: dict[str, Any]) -> str:
    """Why a discovered cohort cannot be judged (few scored devices, a gap CI holding 0)."""
    if not cohort["too_small"]:
        return ""
    low, high = cohort["gap_ci"]
    return (
        f"too few to judge: {cohort['scored']} devices scored, gap 95 % CI [{low:.3f}, {high:.3f}]"
    )


def _ci(row: dict[str, Any]) -> str:
    low, high = row["ci"]
    return f"{row['accuracy']:.4f} [{low:.3f}, {high:.3f}]"


def cohort_figure(report: dict[str, Any], metric: str = "accuracy") -> Figure:
    """Mean device accuracy per cohort, one panel per grouping, selections annotated."""
    tables = list(report["by"].items())
    fig = Figure(figsize=(5.5 * len(tables), 3.8))
    axes = fig.subplots(1, len(tables), squeeze=False)
    for ax, (by, table) in zip(axes[0], tables):
        rows = [r for r in table["cohorts"] if r["accuracy"] is not None]
        xs = np.arange(len(rows))
        ax.bar(xs, [r["accuracy"] for r in rows], color="tab:blue", alpha=0.8)
        for x, r in zip(xs, rows):
            ax.annotate(
                f"sel {r['selected_per_device']:.1f}",
                (x, r["accuracy"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(xs, [r["cohort"].split(":")[0] for r in rows])
        ax.set_ylabel(f"mean device {metric}")
        ax.set_title(f"by {by} (gap {table['gap'] or 0:.3f})")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
