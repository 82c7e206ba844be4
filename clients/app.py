"""The Flower ClientApp: one device that trains the global model on the examples it holds.

`make_client_app(data)` builds it around the device's data source (`DeviceData`, injected);
static settings come with every training message as typed fields (`TrainInstructions`), so the
same ClientApp runs in the simulation (Ray actors, one device after another) and on real devices
(Flower's deployment engine, each device with `partition-id` in its node config).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtrust.compression import CompressionSettings, round_hash_seed
from fedtrust.errors import ConfigError
from fedtrust.privacy.accounting import resolve_delta
from fedtrust.tasks import Task, load_trainable_state, trainable_state

from .budget import STATE_DIR, BudgetStore, DeviceBudget
from .downlink import HeldModels
from .faults import FaultInjector
from .settings import ClientSettings, DeviceDP, FinetuneRequest, TrainInstructions
from .train import EWCPenalty, LocalDP, fisher_diagonal, global_model_loss, train_local
from .updates import LearnedDiff, ResidualStore, encode_update, planned_steps


class DeviceData(Protocol):
    """Where a device's examples come from (a simulated population, or a real device's store)."""

    task: Task

    @property
    def size(self) -> int: ...

    def name(self, device: int) -> str: ...

    def count(self, device: int, server_round: int) -> int: ...

    def rows(self, device: int, server_round: int) -> list[dict[str, Any]]: ...

    def stream_length(self, device: int) -> int: ...


COMPRESSION_KEY = "compression"  # what the server tells this device about compressed links
_MODELS: dict[tuple[int, int], torch.nn.Module] = {}  # one per process, reused by devices
_INITIAL: dict[
    tuple[int, int], dict[str, np.ndarray]
] = {}  # its trainable state as built (version 0)


def make_client_app(data: Callable[[Context], DeviceData]) -> ClientApp:
    """A ClientApp whose devices read their examples from `data(context)` (called in the
    process that serves them, with every message: it should cache what it builds)."""
    app = ClientApp()

    @app.query()
    def check_in(msg: Message, context: Context) -> Message:
        """Tell the server which device this node is and how much data it holds now."""
        source, device = _device(data, context)
        server_round = int(msg.content["config"]["server-round"])
        info = {
            "device": device,
            "name": source.name(device),
            "available": source.count(device, server_round),
        }
        return Message(RecordDict({"device": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        source, device = _device(data, context)
        return train_device(source, device, msg, context)

    return app


def _device(data: Callable[[Context], DeviceData], context: Context) -> tuple[DeviceData, int]:
    source = data(context)
    device = int(context.node_config["partition-id"])
    if device >= source.size:
        raise ValueError(f"partition-id {device} but the population has {source.size} devices")
    return source, device


def train_device(source: DeviceData, device: int, msg: Message, context: Context) -> Message:
    """One round of local training; the reply carries the new weights and public facts.

    Without DP a device may also be asked for the received global model's mean loss on its
    rows (metric "global_loss", measured before training), its Fisher diagonal there
    (ArrayRecord "fisher" next to "arrays") and to train under an EWC anchor (config
    "ewc-lambda" with the averaged Fisher as the message's ArrayRecord "fisher").
    """
    record = msg.content["config"]
    settings = TrainInstructions.from_record(record)
    request = FinetuneRequest.from_record(record, settings.dp)
    server_round = int(record["server-round"])
    faults = None
    if settings.faults is not None:
        faults = FaultInjector(settings.faults, settings.seed, server_round, device)
        faults.before_training()
    torch.set_num_threads(max(1, settings.client.num_cpus))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = source.rows(device, server_round)
    on = torch_device(settings.client)  # cpu, or cuda with client.num_gpus > 0
    model = _model(source, settings.seed).to(on)  # the cached model stays there
    load_trainable_state(model, _global_model(msg, source, settings, context))
    seed = hash((settings.seed, server_round, device)) % 2**31
    received = {k: v.cpu().clone() for k, v in trainable_state(model).items()}
    codec = settings.compression
    c = settings.client
    # hashed diffs: one hashing per round, shared by its devices; rounding: the device's own
    codec_seed = round_hash_seed(settings.seed, server_round) if _hashed(codec) else seed
    steps = planned_steps(len(rows), c.batch_size, c.epochs, c.steps)
    diff = LearnedDiff.start(codec, model, steps, codec_seed, c.weight_decay)
    hooks = {} if diff is None else {"after_step": diff.after_step, "before_step": diff.before_step}
    info: dict[str, Any] = {"device": device, "available": len(rows)}  # public metadata
    metrics: dict[str, Any] = {}
    extra: dict[str, ArrayRecord] = {}
    if settings.dp is None:
        batch_size = settings.client.batch_size
        if settings.global_loss:
            metrics["global_loss"] = global_model_loss(model, source.task, rows, batch_size)
        if request.fisher:
            fisher = fisher_diagonal(model, source.task, rows, batch_size)
            extra["fisher"] = ArrayRecord({k: v.cpu().clone() for k, v in fisher.items()})
        penalty = None
        if request.ewc_lambda is not None:
            anchor = {k: v.clone() for k, v in trainable_state(model).items()}
            fisher = msg.content["fisher"].to_torch_state_dict()
            fisher = {k: v.to(on) for k, v in fisher.items()}
            penalty = EWCPenalty(fisher, anchor, request.ewc_lambda)
        result = train_local(
            model, source.task, rows, settings.client, seed, penalty=penalty, **hooks
        )
        metrics["num-examples"] = len(rows)
        if settings.report_loss:
            metrics["train_loss"] = result.train_loss
    else:
        # Under DP only what the mechanism covers leaves the device: the noised update, and
        # public facts (its budget state is a function of the public config and counts).
        store = BudgetStore(_state_dir(settings, context))
        budget = store.load(device)
        if settings.dp.reproducible_noise:
            budget.forget(server_round)
        dp = local_dp(settings.dp, budget, source.stream_length(device))
        result = train_local(model, source.task, rows, settings.client, seed, dp, **hooks)
        budget.record(server_round, result.spent)
        budget.exhausted = (
            result.budget_exhausted or budget.participations >= settings.dp.participations
        )
        store.save(budget)
        info.update(
            epsilon=result.epsilon,
            **{k: v for k, v in dp.guarantee().items() if k != "noise"},
            participations=budget.participations,
            **{"noise-multiplier": result.noise_multiplier},
            **{"budget-exhausted": budget.exhausted},
        )
    learned = None if diff is None else diff.update()  # last projection: the target density
    weights = {k: v.cpu().clone() for k, v in trainable_state(model).items()}
    if faults is not None:
        weights = faults.corrupt(weights, received)
        metrics = faults.corrupt_metrics(metrics)
        learned = None
    if codec is not None and _encodable(weights, received):
        update = learned or {k: weights[k] - received[k] for k in weights}
        store = ResidualStore(_state_dir(settings, context), run=Path(settings.state_dir).name)
        made_in = int(msg.content[COMPRESSION_KEY]["residual-round"])
        weights = encode_update(
            update, codec, store, device, server_round, codec_seed, made_in, rounding_seed=seed
        )
    reply = RecordDict(
        {
            "arrays": ArrayRecord(weights),
            **extra,
            "metrics": MetricRecord(metrics),
            "device": ConfigRecord(info),
        }
    )
    return Message(reply, reply_to=msg)


def _global_model(
    msg: Message, source: DeviceData, settings: TrainInstructions, context: Context
) -> dict[str, torch.Tensor]:
    """The global model the message carries: dense, or (compressed downlink) the entries that
    changed since the version this device holds."""
    if COMPRESSION_KEY not in msg.content.config_records:
        return msg.content["arrays"].to_torch_state_dict()
    held = HeldModels(_state_dir(settings, context), _initial_state(source, settings.seed))
    state = held.receive(msg.content["arrays"], msg.content[COMPRESSION_KEY])
    return {k: torch.from_numpy(v) for k, v in state.items()}


def _hashed(codec: CompressionSettings | None) -> bool:
    return codec is not None and codec.method == "hashed-diff"


def _encodable(weights: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> bool:
    """Whether `weights` can be encoded as an update of `like`: not when a fault made them
    malformed or non-finite (they are then sent as they are, and the server drops them)."""
    return (
        weights.keys() == like.keys()
        and all(weights[k].shape == like[k].shape for k in like)
        and all(bool(torch.isfinite(v).all()) for v in weights.values())
    )


def torch_device(settings: ClientSettings) -> torch.device:
    """Where a device trains: `cuda` when the run gives each ClientApp a GPU share
    (client.num_gpus > 0; Ray points the actor's CUDA_VISIBLE_DEVICES at its GPU), else the CPU."""
    if settings.num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"client.num_gpus: {settings.num_gpus} but CUDA is not available on this device "
            f"(torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return torch.device("cuda")


def _model(source: DeviceData, seed: int) -> torch.nn.Module:
    key = (id(source), seed)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = source.task.build_model(seed)
        _INITIAL.clear()
        _INITIAL[key] = {
            k: v.cpu().numpy().copy() for k, v in trainable_state(_MODELS[key]).items()
        }
    return _MODELS[key]


def _initial_state(source: DeviceData, seed: int) -> dict[str, np.ndarray]:
    """The trainable state of the model as the device builds it (the global version 0)."""
    _model(source, seed)
    return _INITIAL[(id(source), seed)]


def _state_dir(settings: TrainInstructions, context: Context) -> Path:
    """The device's own persistent storage: node config `state-dir` on a real device, the run
    folder's `devices/` in a simulation."""
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"]))
    return Path(settings.state_dir) / STATE_DIR


def local_dp(dp: DeviceDP, budget: DeviceBudget, num_examples: int) -> LocalDP:
    """Sample-level DP for this participation: the public settings and the device's budget."""
    return LocalDP(
        max_grad_norm=dp.max_grad_norm,
        delta=resolve_delta(dp.target_delta, num_examples),
        target_epsilon=dp.target_epsilon,
        noise_multiplier=dp.noise_multiplier,
        participations_left=max(dp.participations - budget.participations, 1),
        clipping=dp.clipping,
        accountant=dp.accountant,
        relation="replace-one",
        reproducible=dp.reproducible_noise,
        history=budget.history(),
    )
