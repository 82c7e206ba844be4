"""`flwr run .`: the same ServerApp and ClientApp, with settings from the Flower run config.

pyproject.toml's `[tool.flwr.app.config]` holds `config` (a fedtrust TOML config, "" = the
default run), `set` (overrides separated by ";") and `output-dir`. A real device names its
partition with `partition-id` in its node config (and may keep its DP budget in `state-dir`).
"""

from __future__ import annotations

from flwr.app import Context

from fedtrust.clients.app import make_client_app
from fedtrust.server.app import Federation, make_server_app
from fedtrust.server.federation import FederationResult

from .config import Config, load_config
from .population import Population, cached_population
from .runner import build_federation, finish_run, save_results, start_run


def config_of(context: Context) -> Config:
    run_config = context.run_config
    overrides = [s for s in str(run_config.get("set", "")).split(";") if s.strip()]
    cfg = load_config(str(run_config.get("config", "")) or None, overrides)
    if run_config.get("output-dir"):
        cfg.run.output_dir = str(run_config["output-dir"])
    return cfg


class FlowerRun:
    """One `flwr run .` on the server: the config and population between start and finish."""

    def build(self, context: Context) -> Federation:
        self.cfg = config_of(context)
        run_dir, self.population = start_run(self.cfg)
        return build_federation(
            self.cfg,
            run_dir,
            self.population,
            lambda row: print(f"round {row['round']}: {row}", flush=True),
        )

    def finish(self, federation: Federation, result: FederationResult) -> None:
        save_results(federation, result, self.population)
        finish_run(
            self.cfg,
            federation.run_dir,
            self.population,
            result.final,
            federation.evaluator.model,
        )


def device_data(context: Context) -> Population:
    """A device's data: its partition of the population the run config describes."""
    return cached_population(config_of(context))


_run = FlowerRun()
serverapp = make_server_app(_run.build, _run.finish)
clientapp = make_client_app(device_data)
