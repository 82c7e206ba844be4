"""Centralized training of the same task: the baseline every federated and DP result is compared to.

Same task, model, optimiser and evaluation as a federated run, with all training data in one place.
Writes the same kind of run folder: config.toml, metrics.jsonl (one line per epoch),
summary.json, learning_curve.png and model/.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtrust.clients.settings import ClientSettings
from fedtrust.clients.train import LocalDP, sample_rate, train_local
from fedtrust.privacy.accounting import resolve_delta
from fedtrust.privacy.attacks.one_run import GradientCanaries
from fedtrust.server.evaluation import CentralEvaluator
from fedtrust.tasks import build_task

from .canaries import audit_canaries
from .config import Config
from .report import plot_curves, write_summary
from .run_folder import METRICS_FILE, MODEL_FOLDER, write_config


def train_centralized(
    cfg: Config, epochs: int, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> tuple[Path, dict[str, Any]]:
    began = time.perf_counter()
    torch.set_num_threads(max(1, cfg.client.num_cpus))
    task = build_task(cfg.task, seed=cfg.run.seed)
    if cfg.audit.plant_canaries:  # the privacy audit's secrets, in the training set
        task.train.extend(audit_canaries(cfg, task)[1])
    name = cfg.run.name or datetime.now().strftime("train-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    evaluator = CentralEvaluator(
        task, cfg.run.seed, cfg.server.eval_examples, cfg.server.eval_batch_size
    )
    model = evaluator.model
    rows = [{"round": 0, **task.evaluate(model, evaluator.rows, cfg.server.eval_batch_size)}]
    local = _one_epoch(cfg.client)
    dp = _dp(cfg, len(task.train))
    if dp is not None and cfg.privacy.audit_canaries:
        dp.canaries = GradientCanaries(
            list(model.parameters()),
            cfg.privacy.audit_canaries,
            dp.max_grad_norm,
            sample_rate(len(task.train), local.batch_size),
        )
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        seed = int(np.random.default_rng([cfg.run.seed, epoch]).integers(2**31))
        if dp is not None:  # each epoch is one "participation" of the whole dataset
            dp.participations_left = epochs - epoch + 1
        train = train_local(model, task, task.train, local, seed, dp)
        if dp is None:
            privacy = {"train_loss": train.train_loss}  # under DP the loss is not released
        else:
            dp.history += train.spent
            privacy = {
                "epsilon": train.epsilon,
                "noise_multiplier": train.noise_multiplier,
                **dp.guarantee(),
            }
        row = {
            "round": epoch,
            **task.evaluate(model, evaluator.rows, cfg.server.eval_batch_size),
            **privacy,
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        if on_epoch:
            on_epoch(row)
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = task.evaluate(model, task.test, cfg.server.eval_batch_size)
    task.save(model, run_dir / MODEL_FOLDER)
    summary = {
        "task": cfg.task.kind,
        "dataset": cfg.task.dataset,
        "model": cfg.task.model,
        "mode": "centralized",
        "epochs": epochs,
        "primary_metric": task.primary_metric,
        "final": final,
        "privacy": {k: rows[-1][k] for k in ("epsilon", "noise_multiplier")} | dp.guarantee()
        if dp
        else None,
        "seconds": time.perf_counter() - began,
    }
    if dp is not None and dp.canaries is not None:
        summary["privacy"]["audit"] = dp.canaries.audit(dp.delta).report(
            summary["privacy"]["epsilon"], "white-box gradient canaries in DP-SGD"
        )
    write_summary(run_dir, summary)
    plot_curves(
        {"centralized": rows},
        task.primary_metric,
        run_dir / "learning_curve.png",
        title=f"{cfg.task.dataset}: centralized, {task.primary_metric}",
    )
    return run_dir, summary


def _dp(cfg: Config, num_examples: int) -> LocalDP | None:
    p = cfg.privacy
    if not p.enabled:
        return None
    return LocalDP(
        max_grad_norm=p.max_grad_norm,
        delta=resolve_delta(p.target_delta, num_examples),
        target_epsilon=p.target_epsilon,
        noise_multiplier=p.noise_multiplier,
        clipping=p.clipping,
        accountant=p.accountant,
        relation="replace-one",
        reproducible=p.reproducible_noise,
    )


def _one_epoch(client: ClientSettings) -> ClientSettings:
    return dataclasses.replace(client, epochs=1, steps=0)
