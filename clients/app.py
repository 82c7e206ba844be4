"""The Flower ClientApp: one device that trains the global model on the examples it holds.

The server sends the whole run configuration with every message, so the same ClientApp runs in
the simulation (Ray actors, one device after another) and on real devices (Flower's deployment
engine, each device with `partition-id` in its node config).
"""

from __future__ import annotations

import json
import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtrust.tasks import load_trainable_state, trainable_state

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
    dp = _local_dp(cfg, msg, device, len(population.parts[device]))
    metrics = train_local(model, population.task, rows, cfg.client, seed, dp)
    info = {"device": device, "available": len(rows)}
    if dp is not None:
        info["epsilon"] = float(metrics.pop("epsilon"))
        info["noise-multiplier"] = float(metrics.pop("noise_multiplier"))
        info["history"] = json.dumps(metrics.pop("history"))
        info["budget-exhausted"] = bool(metrics.pop("budget_exhausted", False))
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: v.clone() for k, v in trainable_state(model).items()}),
            "metrics": MetricRecord({"num-examples": len(rows), **metrics}),
            "device": ConfigRecord(info),
        }
    )
    return Message(reply, reply_to=msg)


def _local_dp(cfg, msg: Message, device: int, num_examples: int) -> LocalDP | None:
    """Sample-level DP settings, with the device's accountant history kept by the server."""
    p = cfg.privacy
    if not (p.enabled and p.level == "sample"):
        return None
    config = msg.content["config"]
    devices = json.loads(str(config["privacy-devices"])) if "privacy-devices" in config else {}
    state = devices.get(str(device), {})
    return LocalDP(
        max_grad_norm=p.max_grad_norm,
        delta=p.target_delta or 1 / (10 * num_examples),
        target_epsilon=p.target_epsilon,
        noise_multiplier=p.noise_multiplier,
        participations_left=int(state.get("left", 1)),
        clipping=p.clipping,
        accountant=p.accountant,
        history=[tuple(h) for h in state.get("history", [])],
    )
