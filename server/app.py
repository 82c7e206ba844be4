"""The Flower ServerApp.

`make_server_app` builds the app the simulation runner uses (config and run folder given in
Python); the module-level `app` is what `flwr run .` loads, reading the same settings from the
Flower run config (`config`, `set`, `output-dir`, see pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation import run_federation


def make_server_app(
    cfg,
    run_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    result: dict[str, Any] | None = None,
) -> ServerApp:
    from fedtrust.simulations.population import cached_population

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        population = cached_population(cfg)
        final = run_federation(
            grid, cfg, run_dir, population.task, population.size, population.counts, on_round
        )
        if result is not None:
            result["final"] = final

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: same loop, settings from the Flower run config."""
    from fedtrust.simulations.config import load_config
    from fedtrust.simulations.runner import finish_run, start_run

    run_config = context.run_config
    overrides = [s for s in str(run_config.get("set", "")).split(";") if s.strip()]
    cfg = load_config(str(run_config.get("config", "")) or None, overrides)
    if run_config.get("output-dir"):
        cfg.run.output_dir = str(run_config["output-dir"])
    run_dir, population = start_run(cfg)
    final = run_federation(
        grid,
        cfg,
        run_dir,
        population.task,
        population.size,
        population.counts,
        lambda row: print(f"round {row['round']}: {row}", flush=True),
    )
    finish_run(cfg, run_dir, population, final)
