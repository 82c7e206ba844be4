"""The audit report: audit.json, audit.md and a self-contained audit.html (plots inlined).

Readable without fedtrust: plain JSON, Markdown tables, and HTML with base64 PNGs.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import auc

from .report import write_report_files

ATTACKS = ("loss", "reference", "lira_offline", "lira_online")


def write_audit_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the three report files and the PNG plots; returns their paths."""
    roc_png = out_dir / "roc.png"
    curves = {}
    for level in report["levels"]:
        attack = _strongest(level["mia"])
        curves[f"{level['label']} ({attack})"] = level["mia"][attack]["roc"]
    plot_roc(curves, roc_png, title="Membership inference (strongest attack per level)")
    leak_png = plot_leakage(report, out_dir / "leakage.png")
    plain = _jsonable(report)
    write_report_files(out_dir, "audit", plain, audit_markdown(plain))
    (out_dir / "audit.html").write_text(_html(plain, [leak_png, roc_png]))
    return {
        "json": out_dir / "audit.json",
        "md": out_dir / "audit.md",
        "html": out_dir / "audit.html",
        "roc": roc_png,
        "leakage": leak_png,
    }


def audit_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per privacy level: ε, accuracy, MIA per attack, canary extraction."""
    metric = report["primary_metric"]
    head = ["level", "ε achieved", "δ", "neighbours, accountant", f"test {metric}"]
    attacks = [a for a in ATTACKS if any(a in lv["mia"] for lv in report["levels"])]
    head += [f"{a} AUC" for a in attacks]
    head += ["best TPR@1%FPR", "best TPR@0.1%FPR"]
    head += ["audited ε ≥ (input-space)", "audited ε ≥ (white-box)"]
    head += ["canary exact (all)", "canary exposure"]
    levels = sorted({int(k) for lv in report["levels"] for k in lv["canary_summary"]})
    head += [f"exact @{r}×" for r in levels]
    rows = []
    for lv in report["levels"]:
        mia = lv["mia"]
        eps = lv["achieved_epsilon"]
        canaries = lv["canaries"]
        row = [lv["label"], "∞" if eps is None else f"{eps:.2f}"]
        row += (
            ["–", "–"]
            if eps is None
            else [f"{lv['delta']:.2g}", f"{lv.get('relation')}, {lv.get('accountant')}"]
        )
        row.append(f"{lv['test'][metric]:.3f}")
        row += [f"{mia[a]['auc']:.3f}" if a in mia else "–" for a in attacks]
        row.append(f"{max(m['tpr_at_1pct_fpr'] for m in mia.values()):.3f}")
        row.append(f"{max(m['tpr_at_0.1pct_fpr'] for m in mia.values()):.3f}")
        one_run = lv.get("one_run") or {}
        for kind in ("input_space", "white_box"):
            found = one_run.get(kind)
            row.append("–" if not found else f"{found['audited_epsilon_lower_bound']:.2f}")
        row.append(f"{np.mean([c['exact'] for c in canaries]):.2f}" if canaries else "–")
        row.append(f"{np.mean([c['exposure'] for c in canaries]):.2f}" if canaries else "–")
        summary = lv["canary_summary"]
        row += [
            f"{summary[str(r)]['exact_rate']:.2f}" if str(r) in summary else "–" for r in levels
        ]
        rows.append(row)
    return head, rows


def audit_markdown(report: dict[str, Any]) -> str:
    head, rows = audit_table(report)
    lines = [
        f"# Privacy audit: {report['dataset']} / {report['model']}",
        "",
        f"{report['members']} members vs {report['non_members']} non-members (a random split of "
        f"a {report['pool']}-example pool from the training data), {report['shadows']} shadow "
        f"models, {report['epochs']} training epochs per model, "
        f"{len(report['canaries'])} canaries. AUC 0.5 = no leakage.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "Audited ε ≥: one-run audit lower bounds (Steinke, Nasr & Jagielski 2023; 95 % "
        "confidence, at the level's δ). A level whose bound exceeds its achieved ε does not "
        "deliver the guarantee it claims.",
    ]
    if report.get("federated"):
        metric = report["primary_metric"]
        lines += [
            "",
            "## Federated: user-level DP-FedAvg with canary devices",
            "",
            f"| level | ε claimed | δ | neighbours | accountant | audited ε ≥ | test {metric} |",
            "|---|---|---|---|---|---|---|",
        ]
        for lv in report["federated"]:
            p, a = lv["privacy"], lv["one_run"]
            lines.append(
                f"| {lv['label']} | {a['claimed_epsilon']:.2f} | {p['delta']:.2g} | "
                f"{p['relation']} | {p['accountant']} | {a['audited_epsilon_lower_bound']:.2f} | "
                f"{lv['test'].get(metric, float('nan')):.3f} |"
            )
    lines += ["", "## Canaries", "", "| level | canary | repetitions | extracted | exposure |"]
    lines.append("|---|---|---|---|---|")
    for lv in report["levels"]:
        for c in lv["canaries"]:
            mark = "✔" if c["exact"] else f"{c['token_accuracy']:.0%} of tokens"
            lines.append(
                f"| {lv['label']} | {c['text']} | {c['repetitions']} | {c['extracted']} ({mark}) "
                f"| {c['exposure']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def roc_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "Membership inference"
) -> Figure:
    """ROC curves (name -> (fpr, tpr)) on log-log axes with the chance diagonal."""
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    positive = [f[f > 0].min() for f, _ in curves.values() if (np.asarray(f) > 0).any()]
    low = min([1e-3, *positive])
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([low, 1], [low, 1], ls="--", color="grey", lw=1, label="chance")
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.set(xscale="log", yscale="log", xlim=(low, 1), ylim=(low, 1.05), title=title)
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "Membership inference",
) -> Path:
    """`roc_figure` saved as a PNG at `path` (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    roc_figure(curves, title).savefig(path, format="png", dpi=120)
    return path


def leakage_figure(report: dict[str, Any]) -> Figure:
    """Per privacy level: MIA AUC and TPR@1%FPR, canary exact-match, test accuracy."""
    levels = report["levels"]
    xs = np.arange(len(levels))
    metric = report["primary_metric"]
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for attack in ATTACKS:
        ys = [lv["mia"][attack]["auc"] if attack in lv["mia"] else np.nan for lv in levels]
        if not np.all(np.isnan(ys)):
            axes[0].plot(xs, ys, marker="o", label=attack)
    axes[0].axhline(0.5, color="grey", ls=":", lw=1)
    axes[0].set_ylabel("MIA ROC AUC")
    axes[0].legend(fontsize=8)
    tpr = [max(m["tpr_at_1pct_fpr"] for m in lv["mia"].values()) for lv in levels]
    axes[1].plot(xs, tpr, marker="o", label="MIA TPR @ 1% FPR")
    exact = [
        np.mean([c["exact"] for c in lv["canaries"]]) if lv["canaries"] else np.nan for lv in levels
    ]
    axes[1].plot(xs, exact, marker="s", label="canary exact match")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=8)
    axes[2].plot(xs, [lv["test"][metric] for lv in levels], marker="o", color="tab:green")
    axes[2].set_ylabel(f"test {metric}")
    for ax in axes:
        ax.set_xticks(xs, [lv["label"] for lv in levels])
        ax.grid(alpha=0.3)
    fig.suptitle("Leakage and utility by privacy level")
    fig.tight_layout()
    return fig


def plot_leakage(report: dict[str, Any], path: Path) -> Path:
    """`leakage_figure` saved as a PNG at `path`."""
    leakage_figure(report).savefig(path, dpi=120)
    return path


def _strongest(mia: dict[str, Any]) -> str:
    return max(mia, key=lambda a: (mia[a]["tpr_at_1pct_fpr"], mia[a]["auc"]))


def _jsonable(report: dict[str, Any]) -> dict[str, Any]:
    """ROC curves thinned to ≤ 200 points; numpy values to plain floats."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple) and len(x) == 2 and isinstance(x[0], np.ndarray):
            fpr, tpr = x
            keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
            return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        return x

    return clean(report)


def _html(report: dict[str, Any], images: list[Path]) -> str:
    head, rows = audit_table(report)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    table += "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    table += "</table>"
    pictures = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,{_b64(p)}">' for p in images
    )
    markdown = html.escape(audit_markdown(report).split("## Canaries", 1)[1])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedtrust privacy audit</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>Privacy audit: {html.escape(str(report["dataset"]))} /
{html.escape(str(report["model"]))}</h1>
<p>{report["members"]} members vs {report["non_members"]} non-members, {report["shadows"]}
shadow models, {report["epochs"]} epochs per model, {len(report["canaries"])} canaries.
ROC AUC 0.5 means the attacker cannot tell members from non-members.</p>
{table}{pictures}<h2>Canaries</h2><pre>{markdown}</pre></body></html>
"""


def _b64(path: Path) -> str:
    buffer = io.BytesIO(path.read_bytes())
    return base64.b64encode(buffer.getvalue()).decode()
