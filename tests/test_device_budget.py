"""Sample-level DP: a device keeps its own budget; nothing the server sends can reset it."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from tiny_runs import tiny_run_config

from fedtrust.clients.app import make_client_app
from fedtrust.clients.budget import BudgetStore
from fedtrust.privacy.accounting import compute_epsilon
from fedtrust.simulations.federation import device_instructions
from fedtrust.simulations.population import PopulationSource, cached_population
from fedtrust.tasks import trainable_state

TARGET = 4.0


def tmp_run_dir(cfg):
    return Path(cfg.run.output_dir) / cfg.run.name


pytestmark = pytest.mark.usefixtures("run_identity")


def _ask_to_train(cfg, context, server_round: int) -> dict:
    """What a (possibly dishonest) server sends: the model and the instructions, nothing else."""
    population = cached_population(cfg)
    model = population.task.build_model(cfg.run.seed)
    instructions = device_instructions(cfg, tmp_run_dir(cfg), population.size)
    config = ConfigRecord({**instructions, "server-round": server_round})
    arrays = ArrayRecord({k: v.clone() for k, v in trainable_state(model).items()})
    msg = Message(
        RecordDict({"config": config, "arrays": arrays}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    reply = make_client_app(PopulationSource(cfg.to_dict()))(msg, context)
    assert not reply.has_error(), reply.error
    return dict(reply.content["device"]), dict(reply.content["metrics"])


def test_a_server_that_keeps_asking_cannot_make_a_device_exceed_its_budget(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = tiny_run_config(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "budget",
        "partition.num_devices=10",
        "client.epochs=1",
        "client.batch_size=8",
        f"privacy.target_epsilon={TARGET}",
        "privacy.participations=2",
    )
    state_dir = tmp_path / "device-storage"
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "state-dir": str(state_dir)},
        state=RecordDict(),
        run_config={},
    )
    reports = [_ask_to_train(cfg, context, r) for r in (1, 1, 2, 3, 4)]  # round 1 twice
    eps = [info["epsilon"] for info, _ in reports]
    assert eps[0] < eps[1]  # a repeated round is a new release, and is counted
    assert eps == sorted(eps) and max(eps) <= TARGET + 1e-6  # never past the device's target
    assert eps[1] > 0.99 * TARGET  # two participations planned: two spend (almost) all of it
    assert [info["budget-exhausted"] for info, _ in reports][2:] == [True, True, True]
    for _, metrics in reports:
        assert "train_loss" not in metrics  # only what the mechanism covers leaves the device
    budget = BudgetStore(state_dir).load(0)  # the device's own record, not the server's
    assert budget.exhausted and len(budget.history()) >= 2
    spent = compute_epsilon(budget.history(), reports[-1][0]["delta"], "pld", "replace-one")
    assert spent == pytest.approx(eps[-1], rel=3e-3) and spent <= TARGET + 1e-6


def test_with_reproducible_noise_a_rerun_round_is_the_same_release_counted_once(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = tiny_run_config(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "replay",
        "partition.num_devices=10",
        "client.epochs=1",
        "client.batch_size=8",
        f"privacy.target_epsilon={TARGET}",
        "privacy.reproducible_noise=true",
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 3, "state-dir": str(tmp_path / "storage")},
        state=RecordDict(),
        run_config={},
    )
    first, again = (_ask_to_train(cfg, context, 1)[0] for _ in range(2))  # a crash, a re-run
    assert first == again  # the same noise, the same release, the same ε
    assert len(BudgetStore(tmp_path / "storage").load(3).history()) == 1
