"""The `fedtrust` command line: one Typer app for every experiment."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .audit import attack_run, run_audit
from .centralized import train_centralized
from .cli_common import ConfigOpt, SetOpt, console, fail, one_line_errors
from .compare import MODES, SWEEPS, run_compare
from .config import load_config
from .fairness_cli import app as fairness_app
from .progress import RoundPrinter
from .run_folder import load_run_config
from .runner import simulate as run_simulation

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__)
app.add_typer(fairness_app, name="fairness")


@app.callback()
def root() -> None:
    """fedtrust: federated NLU training with differential privacy, privacy and fairness audits."""


@app.command()
def simulate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="continue a stopped run folder")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="only the final line")] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="attach to a running Ray cluster ('auto' on one of its nodes, or HEAD:6379)",
        ),
    ] = None,
) -> None:
    """Run a federated simulation (default: CLINC150 + MiniLM, 100 devices, 10 per round)."""
    if resume is not None and (config is not None or set_):
        fail("--resume takes the run folder's own config; drop --config/--set")
    with one_line_errors():
        cfg = load_run_config(resume) if resume is not None else load_config(config, set_ or [])
        if ray_address is not None:  # where to run, not what: allowed with --resume too
            cfg.run.ray_address = ray_address
        with RoundPrinter(console, cfg, quiet=quiet) as printer:
            run_dir, summary = run_simulation(cfg, resume=resume, on_round=printer)
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
    with one_line_errors():
        cfg = load_config(config, set_ or [])
        cfg.server.rounds = epochs
        with RoundPrinter(console, cfg, unit="epoch") as printer:
            run_dir, summary = train_centralized(cfg, epochs, on_epoch=printer)
    metric = summary["primary_metric"]
    console.print(
        f"[bold green]done[/]: {metric} = {summary['final'][metric]:.4f}; "
        f"report in [bold]{run_dir}[/]"
    )


@app.command()
def compare(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    sweep: Annotated[
        str,
        typer.Option(
            help="selection: uniform vs activity; fairness: + each mitigation; "
            "compression: dense vs each update compression"
        ),
    ] = "selection",
    modes: Annotated[
        str, typer.Option(help="device data settings to run, comma-separated")
    ] = ",".join(MODES),
) -> None:
    """A sweep of federated runs on static and continual data, one report (default: uniform vs
    activity-based selection, 4 runs)."""
    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if sweep not in SWEEPS:
        fail(f"--sweep {sweep!r}: expected one of {', '.join(SWEEPS)}")
    if not chosen or set(chosen) - set(MODES):
        fail(f"--modes {modes!r}: expected a comma-separated subset of {', '.join(MODES)}")
    with one_line_errors():
        cfg = load_config(config, set_ or [])
        with RoundPrinter(console, cfg) as printer:
            out_dir, _ = run_compare(cfg, on_round=printer, sweep=sweep, modes=chosen)
    console.print((out_dir / "comparison.md").read_text())
    console.print(f"report in [bold]{out_dir}[/] (comparison.md, comparison.json, comparison.png)")


@app.command()
def audit(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train models at several privacy levels, attack them (MIA, canaries), write one report."""
    with one_line_errors():
        cfg = load_config(config or "audit", set_ or [])
        with console.status("auditing") as status:
            out_dir, _ = run_audit(
                cfg, progress=lambda m: (console.print(m), status.update(m.strip()))
            )
    console.print((out_dir / "audit.md").read_text().split("## Canaries")[0])
    console.print(f"report in [bold]{out_dir}[/] (audit.html, audit.md, audit.json, *.png)")


@app.command()
def attack(
    kind: Annotated[str, typer.Argument(help="mia or canary")],
    model: Annotated[Path, typer.Option("--model", help="a finished run folder")],
    examples: Annotated[int, typer.Option(help="mia: members + non-members scored")] = 2000,
) -> None:
    """Run one attack on an existing run: membership inference or canary extraction."""
    if not model.is_dir():
        fail(f"{model}: no such run folder")
    with one_line_errors():
        out, report = attack_run(model, kind, examples)
    shown = report["summary"] if kind == "canary" else report
    console.print(json.dumps(shown, indent=1))
    console.print(f"written to [bold]{out}[/]")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; resume with `fedtrust simulate --resume RUN_DIR`")
        sys.exit(130)


if __name__ == "__main__":
    main()
