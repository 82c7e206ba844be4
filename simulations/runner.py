"""Run a federated simulation: Flower's simulation engine (Ray backend) + fedtrust's apps.

Output folder: config.toml (resolved), metrics.jsonl, checkpoint/, summary.json, model/
(safetensors, loadable with transformers), learning_curve.png.
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

from fedtrust.tasks.models import quiet_transformers

from .config import Config, ConfigError, load_config
from .population import Population, cached_population
from .report import plot_curves, write_summary

CONFIG_FILE = "config.toml"


def to_toml(cfg: Config) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def start_run(cfg: Config, resume: Path | None = None) -> tuple[Path, Population]:
    """Create (or reopen) the run folder and build the population; fails early on bad input."""
    if resume is None:
        name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.output_dir) / name
        if (run_dir / "checkpoint").exists():
            raise ConfigError(f"{run_dir}: already holds a run; use --resume {run_dir} to go on")
        cfg.run.name = name  # simulated devices keep their own state under the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(to_toml(cfg))
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


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a fedtrust run folder (no {CONFIG_FILE})")
    return load_config(path)


def finish_run(
    cfg: Config,
    run_dir: Path,
    population: Population,
    final: dict[str, Any],
    seconds: float | None = None,
) -> dict[str, Any]:
    from fedtrust.server.federation import read_metrics

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
        "cohorts": _cohorts(cfg, run_dir, population, rows),
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


def _cohorts(
    cfg: Config, run_dir: Path, population: Population, rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Per-cohort accuracy of the final model (cohorts.json/.md/.png); the summary's excerpt."""
    import torch

    from fedtrust.fairness.cohorts import cohort_report, write_cohort_report
    from fedtrust.server.checkpoint import load_checkpoint
    from fedtrust.tasks import load_trainable_state

    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        return None
    task = population.task
    model = task.build_model(cfg.run.seed)
    load_trainable_state(model, {k: torch.from_numpy(v) for k, v in checkpoint[1].items()})
    try:
        report = cohort_report(task, model, population, rows)
    except ValueError as err:
        logging.getLogger(__name__).warning("no cohort report: %s", err)
        return {"error": str(err)}
    write_cohort_report(report, run_dir)
    activity = report["by"]["activity"]
    return {
        "source": report["source"],
        "worst_gap": report["worst_gap"],
        "activity": {
            "gap": activity["gap"],
            "worst": activity["worst"],
            **{r["cohort"]: r["accuracy"] for r in activity["cohorts"]},
        },
        "lightest_cohort_never_selected": activity["cohorts"][0]["never_selected"],
    }


def _privacy_summary(
    cfg: Config, run_dir: Path, rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    from fedtrust.server.federation import AUDIT_FILE

    if not cfg.privacy.enabled or not rows:
        return None
    summary = {"level": cfg.privacy.level, **_privacy_keys(rows[-1])}
    audit = run_dir / AUDIT_FILE
    if audit.is_file():
        summary["audit"] = json.loads(audit.read_text())
    return summary


def _privacy_keys(row: dict[str, Any]) -> dict[str, Any]:
    keys = (
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
    return {k: row[k] for k in keys if k in row}


def simulate(
    cfg: Config,
    resume: Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run the whole simulation in this process (Ray actors for the devices)."""
    from flwr.clientapp import ClientApp  # noqa: F401 - imported for its side effects on logging
    from flwr.simulation import run_simulation

    from fedtrust.clients.app import app as client_app
    from fedtrust.server.app import make_server_app

    began = time.perf_counter()
    run_dir, population = start_run(cfg, resume)
    result: dict[str, Any] = {}
    server_app = make_server_app(cfg, run_dir, on_round, result)
    backend_config = {
        "client_resources": {"num_cpus": cfg.client.num_cpus, "num_gpus": cfg.client.num_gpus},
        "init_args": {
            "num_cpus": max(os.cpu_count() or 1, cfg.client.num_cpus),
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,  # device errors come back in their reply messages
        },
    }
    _quiet_flower()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=population.size,
        backend_config=backend_config,
    )
    if "final" not in result:
        raise RuntimeError(f"the simulation stopped before its last round; see {run_dir}")
    summary = finish_run(cfg, run_dir, population, result["final"], time.perf_counter() - began)
    return run_dir, summary


def _quiet_flower() -> None:
    """Flower logs every message; fedtrust prints its own progress line per round instead."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    quiet_transformers()
