"""The compression sweep of `fedtrust compare`: accuracy against the bytes each method sent.

Every variant is the same run (partition, seed, rounds) with another `[compression]`; the table
puts each method's final accuracy next to its serialised uplink and downlink bytes and the
ratio to the dense float32 run, and the figure plots accuracy against cumulative uplink bytes.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from .report import cumulative_megabytes

DENSE = "dense float32"
COMPRESSION_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    DENSE: {"compression": {"method": "none"}},
    "top-k 1% + error feedback": {"compression": {"method": "topk", "density": 0.01}},
    "sparse diff 1%": {"compression": {"method": "sparse-diff", "density": 0.01}},
    "sparse diff 4%, 8-bit values": {
        "compression": {"method": "sparse-diff", "density": 0.04, "bits": 8}
    },
    "hashed diff 1%": {"compression": {"method": "hashed-diff", "density": 0.01}},
    "hashed diff 10%, 4-bit values": {
        "compression": {"method": "hashed-diff", "density": 0.1, "bits": 4}
    },
    "8-bit quantised": {"compression": {"method": "quantize", "bits": 8}},
}


def traffic_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """The bytes figures of one run's summary."""
    traffic = summary.get("traffic") or {}
    return {
        "compression": traffic.get("compression", "none"),
        "uplink_bytes": traffic.get("uplink_bytes", 0),
        "downlink_bytes": traffic.get("downlink_bytes", 0),
    }


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with its uplink/downlink saving and accuracy change against the dense run of
    the same data setting (None without one)."""
    dense = {r["data"]: r for r in rows if r["compression"] == "none"}
    out = []
    for r in rows:
        ref = dense.get(r["data"])
        out.append(
            r
            | {
                "uplink_saving": _ratio(ref, r, "uplink_bytes"),
                "downlink_saving": _ratio(ref, r, "downlink_bytes"),
                "metric_change": None if ref is None else r["final"] - ref["final"],
            }
        )
    return out


def _ratio(ref: dict[str, Any] | None, row: dict[str, Any], key: str) -> float | None:
    if ref is None or not row[key]:
        return None
    return ref[key] / row[key]


def compression_table(rows: list[dict[str, Any]]) -> str:
    metric = rows[0]["metric"]
    lines = [
        f"| data | method | final {metric} (full test) | change vs dense | uplink MB "
        "| uplink saving | downlink MB | downlink saving |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        change = "" if r["metric_change"] is None else f"{100 * r['metric_change']:+.2f} pt"
        lines.append(
            f"| {r['data']} | {r['selection']} | {r['final']:.4f} | {change} "
            f"| {r['uplink_bytes'] / 1e6:.1f} | {_times(r['uplink_saving'])} "
            f"| {r['downlink_bytes'] / 1e6:.1f} | {_times(r['downlink_saving'])} |"
        )
    return "\n".join(lines) + "\n"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def bytes_figure(curves: dict, rows: list[dict[str, Any]], metric: str) -> Figure:
    """Left: accuracy (central test subset) against cumulative uplink MB, one line per run;
    right: final accuracy (full test) against the run's total uplink MB."""
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for (mode, variant), history in curves.items():
        label = variant if len({m for m, _ in curves}) == 1 else f"{variant} ({mode})"
        left.plot(
            cumulative_megabytes(history), [r[metric] for r in history], "o-", ms=2, label=label
        )
    for r in rows:
        right.scatter(r["uplink_bytes"] / 1e6, r["final"])
        right.annotate(r["selection"], (r["uplink_bytes"] / 1e6, r["final"]), fontsize=7)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("uplink MB (serialised replies, log scale)")
        ax.grid(alpha=0.3)
    left.set_ylabel(metric.replace("_", " ") + " (central test subset)")
    right.set_ylabel(f"final {metric.replace('_', ' ')} (full test)")
    left.legend(fontsize=7)
    left.set_title("accuracy vs bytes sent")
    right.set_title("final accuracy vs total uplink")
    fig.tight_layout()
    return fig
