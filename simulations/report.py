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
    """One line per run: `metric` on the central test subset against the round and, when the
    rows count bytes, against the cumulative uplink bytes (saved at `path`; the figure is
    returned so its data can be read back)."""
    with_bytes = any("uplink_bytes" in r for rows in curves.values() for r in rows)
    fig = Figure(figsize=(11 if with_bytes else 6, 4))  # no pyplot: the user's backend is left
    axes = fig.subplots(1, 2 if with_bytes else 1, squeeze=False)[0]
    for label, rows in curves.items():
        values = [r[metric] for r in rows]
        axes[0].plot([r["round"] for r in rows], values, marker="o", ms=3, label=label)
        if with_bytes:
            axes[1].plot(cumulative_megabytes(rows), values, marker="o", ms=3, label=label)
    axes[0].set_xlabel("round")
    if with_bytes:
        axes[1].set_xlabel("cumulative uplink MB (serialised replies)")
    for ax in axes:
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def cumulative_megabytes(rows: list[dict[str, Any]], key: str = "uplink_bytes") -> list[float]:
    """The running total of `key` over the rows, in MB (10^6 bytes)."""
    total, out = 0, []
    for r in rows:
        total += int(r.get(key, 0))
        out.append(total / 1e6)
    return out
