"""Run a federated simulation: Flower's simulation engine (Ray backend) + fedtrust's apps.

Output folder: config.toml (resolved), metrics.jsonl, checkpoint/, summary.json, model/
(safetensors, loadable with transformers), learning_curve.png, cohorts.*.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.simulation import run_simulation
from torch import nn

from fedtrust.clients.app import make_client_app
from fedtrust.errors import FederationError
from fedtrust.privacy.noise import REPRODUCIBLE_NOISE_WARNING
from fedtrust.server.app import Federation, make_server_app
from fedtrust.server.evaluation import CentralEvaluator
from fedtrust.server.federation import FederationResult, RoundCallback
from fedtrust.server.registry import DeviceRegistry
from fedtrust.tasks.models import quiet_transformers

from .cohort_summary import cohort_summary, oos_summary
from .config import Config, ConfigError
from .federation import device_instructions, make_strategy
from .population import Population, PopulationSource, cached_population
from .ray_backend import backend_config
from .report import plot_curves, write_summary
from .run_folder import METRICS_FILE, MODEL_FOLDER, read_metrics, write_config
from .tensorboard import TensorBoardLog

AUDIT_FILE = "privacy_audit.json"
DEVICE_PRIVACY_FILE = "device_privacy.json"
RoundHook = Callable[[dict[str, Any]], None]


def start_run(cfg: Config, resume: Path | None = None) -> tuple[Path, Population]:
    """Create (or reopen) the run folder and build the population; fails early on bad input."""
    if resume is None:
        name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.output_dir) / name
        if (run_dir / "checkpoint").exists():
            raise ConfigError(f"{run_dir}: already holds a run; use --resume {run_dir} to go on")
        cfg.run.name = name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
    else:
        run_dir = resume
        cfg.run.output_dir, cfg.run.name = str(resume.parent), resume.name
    population = cached_population(cfg)
    k = cfg.selection.devices_per_round
    if k > population.size:
        raise ConfigError(
            f"selection.devices_per_round: {k} is larger than the population "
            f"({population.size} devices)"
        )
    return run_dir, population


class MetricsLog:
    """Round callback: one JSON line per round in metrics.jsonl (round 0 = initial model)."""

    def __init__(self, run_dir: Path, extra: dict[str, Any] | None = None) -> None:
        self.path, self.extra = run_dir / METRICS_FILE, extra or {}

    def on_start(self, first_round: int, last: dict[str, Any]) -> None:
        # rounds before the checkpoint's, then the checkpoint's own row: a stop between the
        # checkpoint and its metrics line, or after a later round's line, loses nothing
        if first_round == 1:  # a fresh run: round 0, the initial model
            rows = [last]
        elif last:
            before = [r for r in read_metrics(self.path.parent) if r["round"] < first_round - 1]
            rows = [*before, self._with_extra(last)]
        else:  # a checkpoint written before checkpoints kept their row
            rows = [r for r in read_metrics(self.path.parent) if r["round"] < first_round]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def on_round(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(self._with_extra(row)) + "\n")

    def _with_extra(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, **self.extra}


class RoundHookCallback:
    """Round callback around a plain function of the round's metrics (a progress printer)."""

    def __init__(self, hook: RoundHook) -> None:
        self.hook = hook

    def on_start(self, first_round: int, last: dict[str, Any]) -> None:
        pass

    def on_round(self, row: dict[str, Any]) -> None:
        self.hook(row)


def build_federation(
    cfg: Config, run_dir: Path, population: Population, on_round: RoundHook | None = None
) -> Federation:
    """The server's side of a run: strategy, evaluator, device instructions, round callbacks."""
    registry = DeviceRegistry(metadata=population.counts)
    warning = {"noise": REPRODUCIBLE_NOISE_WARNING}
    extra = warning if cfg.privacy.enabled and cfg.privacy.reproducible_noise else {}
    callbacks: list[RoundCallback] = [MetricsLog(run_dir, extra)]
    if cfg.run.tensorboard:
        callbacks.append(TensorBoardLog(run_dir))
    if on_round is not None:
        callbacks.append(RoundHookCallback(on_round))
    s = cfg.server
    return Federation(
        strategy=make_strategy(cfg, registry, population.size),
        evaluator=CentralEvaluator(
            population.task, cfg.run.seed, s.eval_examples, s.eval_batch_size
        ),
        run_dir=run_dir,
        rounds=s.rounds,
        num_devices=population.size,
        device_config=device_instructions(cfg, run_dir, population.size),
        callbacks=callbacks,
    )


def save_results(federation: Federation, result: FederationResult, population: Population) -> None:
    """The final model (transformers format) and the privacy files of a finished run."""
    run_dir = federation.run_dir
    population.task.save(federation.evaluator.model, run_dir / MODEL_FOLDER)
    if result.audit is not None:  # user-level DP with canary devices: claimed vs audited ε
        (run_dir / AUDIT_FILE).write_text(json.dumps(result.audit, indent=1))
    if result.device_privacy:  # per-device sample-level DP: each device's own ε
        (run_dir / DEVICE_PRIVACY_FILE).write_text(json.dumps(result.device_privacy, indent=1))


def finish_run(
    cfg: Config,
    run_dir: Path,
    population: Population,
    final: dict[str, Any],
    model: nn.Module,
    seconds: float | None = None,
) -> dict[str, Any]:
    """summary.json, the learning curve and the cohort report of a finished run (`model`: the
    final model, `final`: its metrics on the whole test split)."""
    rows = read_metrics(run_dir)
    metric = population.task.primary_metric
    summary = {
        "task": cfg.task.kind,
        "dataset": cfg.task.dataset,
        "model": cfg.task.model,
        "devices": population.size,
        "rounds": cfg.server.rounds,
        "selection": cfg.selection.strategy,
        "data": cfg.devices.mode,
        "primary_metric": metric,
        "final": final,
        "final_subset": {k: v for k, v in rows[-1].items() if isinstance(v, float)},
        "best_round": max(rows, key=lambda r: r.get(metric, 0.0))["round"] if rows else None,
        "privacy": _privacy_summary(cfg, run_dir, rows),
        "cohorts": cohort_summary(
            run_dir, population, model, rows, cfg.cohorts, cfg.run.seed, cfg.privacy.enabled
        ),
        "oos_rejection": oos_summary(population.task, model, cfg.server.oos_rejection),
        "seconds": seconds,
    }
    write_summary(run_dir, summary)
    plot_curves(
        {cfg.selection.strategy: rows},
        metric,
        run_dir / "learning_curve.png",
        title=f"{cfg.task.dataset}: {metric} (central test subset)",
    )
    return summary


PRIVACY_KEYS = (
    "epsilon",
    "delta",
    "relation",
    "accountant",
    "sample_rate",
    "epsilon_mean",
    "noise_multiplier",
    "devices_out_of_budget",
    "noise",
)


def _privacy_summary(
    cfg: Config, run_dir: Path, rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    if not cfg.privacy.enabled or not rows:
        return None
    summary = {
        "level": cfg.privacy.level,
        **{k: rows[-1][k] for k in PRIVACY_KEYS if k in rows[-1]},
    }
    audit = run_dir / AUDIT_FILE
    if audit.is_file():
        summary["audit"] = json.loads(audit.read_text())
    return summary


def simulate(
    cfg: Config, resume: Path | None = None, on_round: RoundHook | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run the whole simulation in this process (Ray actors for the devices)."""
    began = time.perf_counter()
    run_dir, population = start_run(cfg, resume)
    finished: list[tuple[Federation, FederationResult]] = []

    def build(context: Context) -> Federation:
        return build_federation(cfg, run_dir, population, on_round)

    def on_result(federation: Federation, result: FederationResult) -> None:
        save_results(federation, result, population)
        finished.append((federation, result))

    _quiet_flower()
    run_simulation(
        server_app=make_server_app(build, on_result),
        client_app=make_client_app(PopulationSource(cfg.to_dict())),
        num_supernodes=population.size,
        backend_config=backend_config(cfg),
    )
    if not finished:
        raise FederationError(f"the simulation stopped before its last round; see {run_dir}")
    federation, result = finished[0]
    model, seconds = federation.evaluator.model, time.perf_counter() - began
    summary = finish_run(cfg, run_dir, population, result.final, model, seconds)
    return run_dir, summary


def _quiet_flower() -> None:
    """Flower logs every message; fedtrust prints its own progress line per round instead."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    quiet_transformers()
