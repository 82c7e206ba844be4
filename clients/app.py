"""The Flower ClientApp: one device that trains the global model on the examples it holds.

The server sends the whole run configuration with every message, so the same ClientApp runs in
the simulation (Ray actors, one device after another) and on real devices (Flower's deployment
engine, each device with `partition-id` in its node config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtrust.privacy.accounting import default_delta
from fedtrust.tasks import load_trainable_state, trainable_state

from .budget import STATE_DIR, BudgetStore, DeviceBudget, planned_participations
from .train import LocalDP, train_local

app = ClientApp()

_MODELS: dict[str, torch.nn.Module] = {}


def _device_context(msg: Message, context: Context):
    from fedtrust.simulations.config import config_from_dict
    from fedtrust.simulations.population import cached_population

    cfg = config_from_dict(json.loads(str(msg.content["config"]["fedtrust-config"])))
    torch.set_num_threads(max(1, int(cfg.client.num_cpus)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    population = cached_population(cfg)
    device = int(context.node_config["partition-id"])
    if device >= population.size:
        raise ValueError(f"partition-id {device} but the population has {population.size} devices")
    return cfg, population, device


def _model(population, seed: int) -> torch.nn.Module:
    key = f"{id(population)}"
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = population.task.build_model(seed)
    return _MODELS[key]


@app.query()
def check_in(msg: Message, context: Context) -> Message:
    """Tell the server which device this node is and how much data it holds now."""
    _, population, device = _device_context(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    info = ConfigRecord(
        {
            "device": device,
            "name": population.names[device],
            "available": int(population.store(device, server_round).count(server_round)),
        }
    )
    return Message(RecordDict({"device": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, population, device = _device_context(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    rows = population.rows(device, server_round)
    model = _model(population, cfg.run.seed)
    load_trainable_state(model, msg.content["arrays"].to_torch_state_dict())
    seed = hash((cfg.run.seed, server_round, device)) % 2**31
    info: dict = {"device": device, "available": len(rows)}  # counts are public metadata
    if not _sample_level_dp(cfg):
        result = train_local(model, population.task, rows, cfg.client, seed)
        metrics = {"num-examples": len(rows)}
        if not cfg.privacy.enabled:  # under user-level DP the loss is not covered either
            metrics["train_loss"] = result.train_loss
    else:
        # Under DP only what the mechanism covers leaves the device: the noised update, and
        # public facts (its budget state is a function of the public config and counts).
        store = BudgetStore(_state_dir(cfg, context))
        budget = store.load(device)
        if cfg.privacy.reproducible_noise:
            budget.forget(server_round)
        dp = _local_dp(cfg, budget, population.size, len(population.parts[device]))
        result = train_local(model, population.task, rows, cfg.client, seed, dp)
        budget.record(server_round, result.spent)
        budget.exhausted = result.budget_exhausted or budget.participations >= _planned(
            cfg, population.size
        )
        store.save(budget)
        info.update(
            epsilon=result.epsilon,
            **{k: v for k, v in dp.guarantee().items() if k != "noise"},
            participations=budget.participations,
            **{"noise-multiplier": result.noise_multiplier},
            **{"budget-exhausted": budget.exhausted},
        )
        metrics = {}
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: v.clone() for k, v in trainable_state(model).items()}),
            "metrics": MetricRecord(metrics),
            "device": ConfigRecord(info),
        }
    )
    return Message(reply, reply_to=msg)


def _sample_level_dp(cfg) -> bool:
    return cfg.privacy.enabled and cfg.privacy.level == "sample"


def _state_dir(cfg, context: Context) -> Path:
    """The device's own persistent storage: node config `state-dir` on a real device, the run
    folder's `devices/` in a simulation."""
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"]))
    return Path(cfg.run.output_dir) / cfg.run.name / STATE_DIR


def _planned(cfg, num_devices: int) -> int:
    p = cfg.privacy
    if p.participations:
        return p.participations
    return planned_participations(cfg.server.rounds, cfg.selection.devices_per_round, num_devices)


def _local_dp(cfg, budget: DeviceBudget, num_devices: int, num_examples: int) -> LocalDP:
    """Sample-level DP settings from the public config and the device's own budget."""
    p = cfg.privacy
    return LocalDP(
        max_grad_norm=p.max_grad_norm,
        delta=p.target_delta or default_delta(num_examples),
        target_epsilon=p.target_epsilon,
        noise_multiplier=p.noise_multiplier,
        participations_left=max(_planned(cfg, num_devices) - budget.participations, 1),
        clipping=p.clipping,
        accountant=p.accountant,
        relation="replace-one",
        reproducible=p.reproducible_noise,
        history=budget.history(),
    )
