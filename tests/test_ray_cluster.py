"""`run.ray_address`: attach a run to an existing Ray cluster instead of starting a local Ray.

The slow test starts a real two-node cluster on this machine (`ray start --head` and a second
`ray start --address=...` node, one CPU each), runs a tiny simulation on it and reads Ray's own
records (GCS actor table and task events) to show that ClientApps ran on both nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from ray._private import state as ray_state  # GCS tables: list_actors/list_tasks need a dashboard
from ray.core.generated import gcs_pb2
from tiny_runs import tiny_run_config

from fedtrust.errors import ConfigError, FederationError
from fedtrust.simulations.config import load_config
from fedtrust.simulations.ray_backend import backend_config, check_cluster, init_args
from fedtrust.simulations.runner import simulate

RAY = str(Path(sys.executable).with_name("ray"))
QUIET = {"logging_level": "ERROR", "log_to_driver": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> str:
    return ",".join(str(_free_port()) for _ in range(n))


# --- fast: the backend config and the unreachable-address error ---------------------------


def test_a_local_run_sizes_its_own_ray_instance():
    cfg = load_config(None, ["client.num_cpus=3"])
    config = backend_config(cfg)
    assert config["client_resources"] == {"num_cpus": 3, "num_gpus": 0.0}
    assert config["init_args"]["num_cpus"] >= 3
    assert "address" not in config["init_args"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_local_run_asking_for_gpus_without_cuda_is_a_one_line_error():
    cfg = load_config(None, ["client.num_gpus=0.5"])
    with pytest.raises(ConfigError, match=r"^client.num_gpus: 0.5 but CUDA is not available"):
        backend_config(cfg)


def test_a_cluster_run_passes_the_address_and_no_cpu_count():
    cfg = load_config(None, ['run.ray_address="10.0.0.5:6379"', "client.num_gpus=0.5"])
    args = init_args(cfg)  # backend_config would probe the (absent) cluster first
    assert args["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in args and "num_gpus" not in args  # Ray refuses them with an address
    json.dumps(args)  # Flower sends the backend config through JSON


def test_an_unreachable_address_is_a_quick_one_line_error():
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    cfg = load_config(None, [f'run.ray_address="{address}"'])
    began = time.perf_counter()
    with pytest.raises(FederationError) as err:
        backend_config(cfg)
    assert time.perf_counter() - began < 10  # ray.init alone retries for minutes
    message = str(err.value)
    assert "run.ray_address" in message and repr(address) in message
    assert "\n" not in message
    assert not ray.is_initialized()


def test_a_malformed_address_is_a_one_line_error():
    with pytest.raises(FederationError, match=r"run.ray_address: .*'no-port-here'"):
        check_cluster("no-port-here")


# --- slow: a real two-node cluster ----------------------------------------------------------


def _start_node(log: Path, *args: str) -> subprocess.Popen:
    """`ray start --block` in its own process group: the node's processes (GCS, raylet, agents,
    workers) are that group, so teardown ends exactly them (`ray stop` would end every Ray
    process of this user on the machine, other runs' included)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=1", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )


def _wait_started(node: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text():
        if node.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop_node(node: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(1)  # the group's other processes exit on their own signal
        try:
            os.killpg(node.pid, 0)
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[str]:
    """A head and a second node, 1 CPU each, on this machine; yields the GCS address."""
    tmp = Path(tempfile.mkdtemp(prefix="ftray"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(
            _start_node(
                tmp / "head.log",
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--temp-dir={tmp}",
                f"--ray-client-server-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
                f"--worker-port-list={_free_ports(12)}",
            )
        )
        _wait_started(nodes[0], tmp / "head.log")
        nodes.append(
            _start_node(
                tmp / "node.log",
                f"--address={address}",
                f"--temp-dir={tmp}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
                f"--worker-port-list={_free_ports(12)}",
            )
        )
        _wait_started(nodes[1], tmp / "node.log")
        ray.init(address=address, **QUIET)
        try:
            deadline = time.monotonic() + 30
            while sum(n["Alive"] and n["Resources"].get("CPU", 0) > 0 for n in ray.nodes()) < 2:
                assert time.monotonic() < deadline, "the second node did not join"
                time.sleep(0.5)
        finally:
            ray.shutdown()
        yield address
    finally:
        if ray.is_initialized():  # a failed run may leave this process attached
            ray.shutdown()
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(tmp, ignore_errors=True)


def _client_app_nodes(address: str) -> tuple[set[str], set[str]]:
    """Node ids of the cluster's ClientApp actors and of the nodes that ran ClientApp calls
    (`ClientAppActor.run` tasks), from the GCS: finished actors and tasks keep their node."""
    ray.init(address=address, **QUIET)
    try:
        actors = ray_state.actors()
        actor_nodes = {
            a["Address"]["NodeID"]
            for a in actors.values()
            if a["ActorClassName"] == "ClientAppActor"
        }
        run_nodes: set[str] = set()
        for raw in ray_state.state._connect_and_get_accessor().get_task_events():
            event = gcs_pb2.TaskEvents.FromString(raw)
            if event.task_info.name.endswith("ClientAppActor.run"):
                node = event.state_updates.node_id or event.task_info.node_id
                if node:
                    run_nodes.add(node.hex())
        return actor_nodes, run_nodes
    finally:
        ray.shutdown()


@pytest.mark.slow  # a two-node Ray cluster + Flower's simulation engine
def test_a_run_attached_to_a_two_node_cluster_trains_on_both_nodes(
    two_node_cluster, tmp_path, tiny_bert, intent_jsonl
):
    cfg = tiny_run_config(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "cluster",
        "partition.num_devices=10",
        "selection.devices_per_round=4",
        "server.rounds=2",
        "client.steps=3",
        "client.batch_size=16",
        f'run.ray_address="{two_node_cluster}"',
    )
    run_dir, summary = simulate(cfg)
    assert not ray.is_initialized()  # Flower disconnected this driver ...
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(len(r["devices"]) == 4 and not r["failures"] for r in rows[1:])
    assert (run_dir / "checkpoint").is_dir() and (run_dir / "model").is_dir()  # on the driver
    assert summary["rounds"] == 2

    actor_nodes, run_nodes = _client_app_nodes(two_node_cluster)  # ... the cluster lives on
    assert len(actor_nodes) >= 2, actor_nodes
    assert len(run_nodes) >= 2, run_nodes
    assert run_nodes <= actor_nodes


@pytest.mark.slow
def test_a_cluster_without_room_for_one_client_app_is_a_one_line_error(two_node_cluster):
    cfg = load_config(None, [f'run.ray_address="{two_node_cluster}"', "client.num_cpus=2"])
    with pytest.raises(FederationError) as err:
        backend_config(cfg)  # every node has 1 CPU
    message = str(err.value)
    assert message.startswith("client.num_cpus / client.num_gpus: 2 CPUs and 0 GPUs per device")
    assert repr(two_node_cluster) in message and "1 CPU, 0 GPU; 1 CPU, 0 GPU" in message
    assert not ray.is_initialized()
    cfg.client.num_cpus = 1
    assert backend_config(cfg)["init_args"]["address"] == two_node_cluster
