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
from fedtrust.errors import FederationError, RunFolderError
from fedtrust.privacy.noise import REPRODUCIBLE_NOISE_WARNING
from fedtrust.server.app import Federation, make_server_app
from fedtrust.server.checkpoint import checkpoint_folder, load_checkpoint
from fedtrust.server.evaluation import CentralEvaluator
from fedtrust.server.federation import FederationResult, RoundCallback
from fedtrust.server.registry import DeviceRegistry
from fedtrust.tasks import trainable_state
from fedtrust.tasks.models import quiet_transformers

from .cohort_summary import cohort_summary, oos_summary
from .config import Config, ConfigError
from .federation import compression, device_instructions, make_strategy
from .flower_scale import fast_message_polling
from .population import Population, PopulationSource, cached_population
from .ray_backend import backend_config
from .report import plot_curves, write_summary
from .run_folder import (
    METRICS_FILE,
    MODEL_FOLDER,
    load_run_config,
    read_metrics,
    write_config,
    write_metrics,
)
from .tensorboard import TensorBoardLog

AUDIT_FILE = "privacy_audit.json"
DEVICE_PRIVACY_FILE = "device_privacy.json"
RoundHook = Callable[[dict[str, Any]], None]


def start_run(cfg: Config, resume: Path | None = None) -> tuple[Path, Population]:
    """Create (or reopen) the run folder and build the population; fails early on bad input.

    Everything that can be checked before training is: the population (bad data, more devices
    per round than devices), a hashed-diff bucket count the model cannot take, the checkpoint
    to resume from (a corrupt one is a one-line error naming the file) and that the run folder
    can be written. A run that fails these checks
    leaves no folder behind: a new run folder is created only once they pass.
    """
    if resume is None:
        name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.output_dir) / name
        if checkpoint_folder(run_dir) is not None:
            raise ConfigError(f"{run_dir}: already holds a run; use --resume {run_dir} to go on")
        cfg.run.name = name
    else:
        run_dir = resume
        load_run_config(run_dir)  # a missing, foreign or corrupt run folder: one line
        load_checkpoint(run_dir)  # a corrupt checkpoint: one line, before Ray starts
        cfg.run.output_dir, cfg.run.name = str(resume.parent), resume.name
    population = cached_population(cfg)
    k = cfg.selection.devices_per_round
    if k > population.size:
        raise ConfigError(
            f"selection.devices_per_round: {k} is larger than the population "
            f"({population.size} devices)"
        )
    check_compression(cfg, population)
    if resume is None:
        _create_run_folder(cfg, run_dir)
    else:
        _probe_writable(run_dir)
    return run_dir, population


def _create_run_folder(cfg: Config, run_dir: Path) -> None:
    """The run folder with its config.toml; an unwritable run.output_dir is one ConfigError,
    and the folders made on the way are removed again."""
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # innermost first
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
    except OSError as err:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise ConfigError(
            f"{err.filename or run_dir}: cannot write the run folder "
            f"(run.output_dir = {cfg.run.output_dir!r}: {err.strerror or err})"
        ) from None


def _probe_writable(run_dir: Path) -> None:
    """A run folder to resume must take new files (checkpoints, metrics, the model)."""
    probe = run_dir / ".write-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(
            f"{run_dir}: cannot write to the run folder ({err.strerror or err})"
        ) from None


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
        write_metrics(self.path.parent, rows)  # atomic: a kill now loses no earlier row

    def on_round(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(self._with_extra(row)) + "\n")

    def _with_extra(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, **self.extra}


class RoundHookCallback:
    """Round callback around a plain function of the round's metrics (a progress printer);
    its `on_reply` method, if it has one, gets the round's live progress."""

    def __init__(self, hook: RoundHook) -> None:
        self.hook = hook
        if (on_reply := getattr(hook, "on_reply", None)) is not None:
            self.on_reply = on_reply

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
        round_timeout=s.round_timeout,
        retries=s.retries,
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
        "failures": sum(len(r.get("failures", [])) for r in rows),  # dropped replies
        "skipped_rounds": [r["round"] for r in rows if r.get("skipped")],
        "traffic": traffic_summary(cfg, rows),
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


def traffic_summary(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Serialised bytes sent over the whole run on each link, and how updates were encoded."""
    return {
        "compression": cfg.compression.method,
        "uplink_bytes": sum(int(r.get("uplink_bytes", 0)) for r in rows),
        "downlink_bytes": sum(int(r.get("downlink_bytes", 0)) for r in rows),
    }


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


def check_compression(cfg: Config, population: Population) -> None:
    """ConfigError now, not on the devices in round 1, for a hashed-diff bucket count the
    model's trainable tensors cannot take."""
    codec = compression(cfg)
    if codec is not None and codec.method == "hashed-diff":
        model = population.task.build_model(cfg.run.seed)
        codec.check_shapes({k: tuple(v.shape) for k, v in trainable_state(model).items()})


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
    with fast_message_polling():
        run_simulation(
            server_app=make_server_app(build, on_result),
            client_app=make_client_app(PopulationSource(_portable(cfg.to_dict()))),
            num_supernodes=population.size,
            backend_config=backend_config(cfg),
        )
    if not finished:
        raise FederationError(f"the simulation stopped before its last round; see {run_dir}")
    federation, result = finished[0]
    model, seconds = federation.evaluator.model, time.perf_counter() - began
    summary = finish_run(cfg, run_dir, population, result.final, model, seconds)
    return run_dir, summary


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """The config devices get: local paths made absolute (on a Ray cluster, workers do not
    share the driver's working directory)."""
    task = dict(config["task"])
    for key in ("dataset", "test_dataset", "validation_dataset", "model"):
        if task.get(key) and Path(task[key]).exists():
            task[key] = str(Path(task[key]).resolve())
    return {**config, "task": task}


def _quiet_flower() -> None:
    """Flower logs every message, and a device's exception with its traceback; fedtrust prints
    its own progress line per round and logs each failed device with its reason instead."""
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    quiet_transformers()
