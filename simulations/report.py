"""What a run leaves behind besides metrics.jsonl: summary.json and a learning-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def plot_curves(
    curves: dict[str, list[dict[str, Any]]], metric: str, path: Path, title: str = ""
) -> Path:
    """One line per run: `metric` on the central test subset against the round."""
    fig, ax = plt.subplots(figsize=(6, 4))
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
    plt.close(fig)
    return path
