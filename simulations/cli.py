"""The `fedtrust` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__)
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override: section.key=value")
]


@app.callback()
def root() -> None:
    """fedtrust: federated NLU training with differential privacy, privacy and fairness audits."""


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.command()
def simulate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="continue a stopped run folder")] = None,
) -> None:
    """Run a federated simulation (default: CLINC150 + MiniLM, 100 devices, 10 per round)."""
    from .progress import RoundPrinter
    from .runner import load_run_config
    from .runner import simulate as run

    try:
        if resume is not None:
            if config is not None or set_:
                _fail("--resume takes the run folder's own config; drop --config/--set")
            cfg = load_run_config(resume)
        else:
            cfg = load_config(config, set_ or [])
        printer = RoundPrinter(console, cfg)
        with printer:
            run_dir, summary = run(cfg, resume=resume, on_round=printer)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
        return
    metric = summary["primary_metric"]
    console.print(
        f"[bold green]done[/]: {metric} = {summary['final'][metric]:.4f} on the full test split; "
        f"report in [bold]{run_dir}[/] (summary.json, metrics.jsonl, learning_curve.png, model/)"
    )


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    epochs: Annotated[int, typer.Option(help="passes over the whole training set")] = 2,
) -> None:
    """Centralized training of the same task (no federation): the baseline for every comparison."""
    from .centralized import train_centralized
    from .progress import RoundPrinter

    try:
        cfg = load_config(config, set_ or [])
        cfg.server.rounds = epochs
        printer = RoundPrinter(console, cfg, unit="epoch")
        with printer:
            run_dir, summary = train_centralized(cfg, epochs, on_epoch=printer)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
        return
    metric = summary["primary_metric"]
    console.print(
        f"[bold green]done[/]: {metric} = {summary['final'][metric]:.4f}; "
        f"report in [bold]{run_dir}[/]"
    )


@app.command()
def compare(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Uniform vs activity-based selection, on static and continual data (4 runs, one report)."""
    from .compare import run_compare
    from .progress import RoundPrinter

    try:
        cfg = load_config(config, set_ or [])
        printer = RoundPrinter(console, cfg)
        with printer:
            out_dir, rows = run_compare(cfg, on_round=printer)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
        return
    console.print((out_dir / "comparison.md").read_text())
    console.print(f"report in [bold]{out_dir}[/] (comparison.md, comparison.json, comparison.png)")


@app.command()
def audit(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train models at several privacy levels, attack them (MIA, canaries), write one report."""
    from fedtrust.privacy.audit import run_audit

    try:
        cfg = load_config(config or "audit", set_ or [])
        with console.status("auditing") as status:
            out_dir, report = run_audit(
                cfg, progress=lambda m: (console.print(m), status.update(m.strip()))
            )
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
        return
    console.print((out_dir / "audit.md").read_text().split("## Canaries")[0])
    console.print(f"report in [bold]{out_dir}[/] (audit.html, audit.md, audit.json, *.png)")


@app.command()
def attack(
    kind: Annotated[str, typer.Argument(help="mia or canary")],
    model: Annotated[Path, typer.Option("--model", help="a finished run folder")],
    examples: Annotated[int, typer.Option(help="mia: members + non-members scored")] = 2000,
) -> None:
    """Run one attack on an existing run: membership inference or canary extraction."""
    import json

    from fedtrust.privacy.audit import attack_run

    if not model.is_dir():
        _fail(f"{model}: no such run folder")
    try:
        out, report = attack_run(model, kind, examples)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
        return
    shown = report["summary"] if kind == "canary" else report
    console.print(json.dumps(shown, indent=1))
    console.print(f"written to [bold]{out}[/]")


def _mount_fairness() -> None:
    try:
        from fedtrust.fairness.cli import app as fairness_app
    except ImportError:  # pragma: no cover - fairness CLI not installed
        return
    app.add_typer(fairness_app, name="fairness")


_mount_fairness()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; resume with `fedtrust simulate --resume RUN_DIR`")
        sys.exit(130)


if __name__ == "__main__":
    main()
