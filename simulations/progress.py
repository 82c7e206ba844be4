"""A rich progress bar with one line per finished round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .config import Config


def progress_bar(console: Console, label: str) -> Progress:
    """fedtrust's progress bar: label, bar, done/total, elapsed; gone when finished."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


class RoundPrinter:
    """A progress bar with one printed line per finished round (or epoch)."""

    def __init__(self, console: Console, cfg: Config, unit: str = "round") -> None:
        self.console, self.cfg, self.unit = console, cfg, unit
        self.progress = progress_bar(console, f"{unit}s")
        self.bar = self.progress.add_task("rounds", total=cfg.server.rounds)

    def __enter__(self) -> RoundPrinter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, row: dict[str, Any]) -> None:
        shown = ["in_scope_accuracy", "accuracy", "perplexity", "loss", "train_loss", "epsilon"]
        parts = [f"{k} {row[k]:.4f}" for k in shown if k in row]
        self.console.print(
            f"{self.unit} {row['round']:>3}/{self.cfg.server.rounds}  "
            + "  ".join(parts)
            + f"  ({row['seconds']:.1f} s"
            + (f", {len(row['devices'])} devices)" if "devices" in row else ")")
        )
        self.progress.update(self.bar, completed=row["round"])
