"""`flwr run .`: the ServerApp and ClientApp entry points read settings from the run config."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtrust.clients.settings import TrainInstructions
from fedtrust.simulations.flower_app import FlowerRun, clientapp, config_of, device_data

pytestmark = pytest.mark.usefixtures("run_identity")


def _context(tmp_path, tiny_bert, intent_jsonl, partition_id: int) -> Context:
    overrides = [
        f'task.dataset="{intent_jsonl}"',
        f'task.model="{tiny_bert}"',
        "partition.num_devices=5",
        "selection.devices_per_round=2",
        "server.rounds=2",
        "client.epochs=1",
    ]
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition_id},
        state=RecordDict(),
        run_config={"config": "", "set": ";".join(overrides), "output-dir": str(tmp_path)},
    )


def test_the_client_app_checks_in_as_its_partition(tmp_path, tiny_bert, intent_jsonl):
    context = _context(tmp_path, tiny_bert, intent_jsonl, partition_id=3)
    query = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    reply = clientapp(query, context)
    assert not reply.has_error(), reply.error
    info = reply.content["device"]
    population = device_data(context)
    assert population.size == 5
    assert (info["device"], info["available"]) == (3, population.count(3, 1))


def test_the_server_app_builds_its_federation_from_the_run_config(
    tmp_path, tiny_bert, intent_jsonl
):
    context = _context(tmp_path, tiny_bert, intent_jsonl, partition_id=0)
    federation = FlowerRun().build(context)
    cfg = config_of(context)
    assert (federation.rounds, federation.num_devices) == (2, 5)
    assert federation.run_dir.parent == tmp_path and (federation.run_dir / "config.toml").is_file()
    sent = TrainInstructions.from_record(federation.device_config)
    assert sent.client == cfg.client and sent.dp is None and sent.report_loss
