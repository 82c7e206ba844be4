"""A rich progress bar with one line per finished round, and live progress inside a round.

Only on a terminal: in a log (CI, a file) rich draws no bar and only the round lines remain;
`quiet` drops those too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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
    """A progress bar with one printed line per finished round (or epoch), and during a round
    the devices done of those asked, examples/s and the ETA of the round and of the run."""

    def __init__(
        self, console: Console, cfg: Config, unit: str = "round", quiet: bool = False
    ) -> None:
        self.console, self.cfg, self.unit, self.quiet = console, cfg, unit, quiet
        self.progress = progress_bar(console, f"{unit}s")
        self.progress.disable = quiet
        self.bar = self.progress.add_task("rounds", total=cfg.server.rounds)
        self.inside = self.progress.add_task("", total=None, visible=False)
        self._seconds: list[float] = []  # the finished rounds' durations

    def __enter__(self) -> RoundPrinter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_reply(
        self, server_round: int, done: int, asked: int, examples: int, seconds: float
    ) -> None:
        """Live progress inside a round (`fedtrust.server.federation.RoundCallback`)."""
        elapsed = max(seconds, 1e-3)
        round_eta = elapsed / max(done, 1) * (asked - done)
        mean_round = np.mean(self._seconds) if self._seconds else elapsed + round_eta
        run_eta = round_eta + mean_round * (self.cfg.server.rounds - server_round)
        self.progress.update(
            self.inside,
            description=(
                f"round {server_round}: {done}/{asked} devices, {examples / elapsed:.0f} ex/s, "
                f"round ETA {round_eta:.0f} s, run ETA {run_eta / 60:.1f} min"
            ),
            visible=True,
        )

    def __call__(self, row: dict[str, Any]) -> None:
        self._seconds.append(row["seconds"])
        self.progress.update(self.inside, visible=False)
        self.progress.update(self.bar, completed=row["round"])
        if self.quiet:
            return
        shown = ["in_scope_accuracy", "accuracy", "perplexity", "loss", "train_loss", "epsilon"]
        parts = [f"{k} {row[k]:.4f}" for k in shown if k in row]
        failed = f", {len(row['failures'])} failed" if row.get("failures") else ""
        skipped = ", skipped: too few replies" if row.get("skipped") else ""
        self.console.print(
            f"{self.unit} {row['round']:>3}/{self.cfg.server.rounds}  "
            + "  ".join(parts)
            + f"  ({row['seconds']:.1f} s"
            + (f", {len(row['devices'])} devices" if "devices" in row else "")
            + failed
            + skipped
            + ")"
        )
