"""Report files: the json/md/png triple every report writes, summary.json, learning curves."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def write_report_files(
    out_dir: Path,
    stem: str,
    data: Any,
    markdown: str,
    figure: Figure | None = None,
    dpi: int = 120,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """The shape of every fedtrust report: `stem`.json (the figures), `stem`.md (for people)
    and, with a figure, `stem`.png, in `out_dir`. Returns out_dir."""
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2, default=default) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    if figure is not None:
        figure.savefig(out_dir / f"{stem}.png", dpi=dpi)
    return out_dir


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def plot_curves(
    curves: dict[str, list[dict[str, Any]]], metric: str, path: Path, title: str = ""
) -> Figure:
    """One line per run: `metric` on the central test subset against the round (saved at
    `path`; the figure is returned so its data can be read back)."""
    fig = Figure(figsize=(6, 4))  # no pyplot: the user's matplotlib backend is left alone
    ax = fig.subplots()
    for label, rows in curves.items():
        ax.plot(
            [r["round"] for r in rows], [r[metric] for r in rows], marker="o", ms=3, label=label
        )
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
