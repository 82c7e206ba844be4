"""Flower's Ray backend settings for a run: a local Ray instance, or an existing Ray cluster.

`run.ray_address` = "" starts a local Ray instance sized to this machine. Any other value
("auto", "10.0.0.5:6379") attaches the run to a running Ray cluster (`ray start --head` on one
machine, `ray start --address=HEAD:6379` on the others); the ServerApp, the run folder and the
checkpoints stay in this process, the devices' ClientApps run as Ray actors anywhere in the
cluster, each holding `client.num_cpus` CPUs and `client.num_gpus` GPUs.

Flower's RayBackend calls `ray.init(**init_args)` unless Ray is already initialised, and
`ray.shutdown()` when the simulation ends: for an attached driver that only disconnects it,
the cluster keeps running.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray
import torch
from ray._private.services import canonicalize_bootstrap_address  # Ray's own "auto" lookup

from fedtrust.errors import ConfigError, FederationError

from .config import Config

PROBE_SECONDS = 5.0  # an unreachable address would otherwise hang ray.init for minutes
QUIET = {
    "logging_level": logging.ERROR,
    "log_to_driver": False,  # device errors come back in their reply messages
}


def backend_config(cfg: Config) -> dict[str, Any]:
    """`run_simulation`'s backend_config: per-ClientApp resources and how Ray starts.

    With `run.ray_address` set, first checks that a Ray cluster answers there and that one of
    its nodes can hold a device's ClientApp (one-line FederationErrors otherwise); a local run
    with `client.num_gpus > 0` needs CUDA here (a ConfigError otherwise)."""
    resources = {"num_cpus": cfg.client.num_cpus, "num_gpus": cfg.client.num_gpus}
    if cfg.run.ray_address:
        check_cluster(cfg.run.ray_address, resources)
    elif cfg.client.num_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"client.num_gpus: {cfg.client.num_gpus} but CUDA is not available on this machine "
            "(set it to 0, or run.ray_address to a Ray cluster with GPU nodes)"
        )
    return {"client_resources": resources, "init_args": init_args(cfg)}


def init_args(cfg: Config) -> dict[str, Any]:
    """`ray.init`'s arguments: an address to attach to, or the size of a local instance (Ray
    refuses num_cpus together with an address: a cluster's nodes declare their own)."""
    if cfg.run.ray_address:
        return {"address": cfg.run.ray_address, **QUIET}
    return {
        "num_cpus": max(os.cpu_count() or 1, cfg.client.num_cpus),
        "include_dashboard": False,
        **QUIET,
    }


def check_cluster(
    address: str, resources: dict[str, float] | None = None, timeout: float = PROBE_SECONDS
) -> str:
    """The GCS address (host:port) a Ray cluster answers at for `address`; raises a one-line
    FederationError naming run.ray_address when none does, or naming client.num_cpus /
    client.num_gpus when no node has room for one ClientApp with `resources`.

    A TCP probe first (ray.init would retry an unreachable address for minutes), then one
    connect and disconnect, so that a version mismatch, a refused driver or a cluster too small
    is reported here rather than deep inside Flower's simulation thread."""
    try:
        gcs = _gcs_address(address)
        host, _, port = gcs.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:  # ConnectionError, timeouts, unknown hosts, bad ports
        raise FederationError(
            f"run.ray_address: no Ray cluster answers at {address!r} ({_one_line(err)})"
        ) from err
    attached = ray.is_initialized()  # then Flower reuses this process's connection as it is
    try:
        if not attached:
            ray.init(address=address, **QUIET)
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    except Exception as err:  # Ray raises RuntimeError, ValueError, ConnectionError...
        raise FederationError(
            f"run.ray_address: cannot attach to the Ray cluster at {address!r} ({_one_line(err)})"
        ) from err
    finally:
        if not attached:
            ray.shutdown()  # an attached driver only disconnects; the cluster keeps running
    if resources is not None and not any(_fits(node, resources) for node in nodes):
        have = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes)
        raise FederationError(
            f"client.num_cpus / client.num_gpus: {resources['num_cpus']:g} CPUs and "
            f"{resources['num_gpus']:g} GPUs per device fit no node of the Ray cluster at "
            f"{address!r} (nodes: {have or 'none'})"
        )
    return gcs


def _fits(node: dict[str, float], resources: dict[str, float]) -> bool:
    """Whether a node can hold one ClientApp actor (what Flower's actor pool counts)."""
    return node.get("CPU", 0) >= resources["num_cpus"] and (
        resources["num_gpus"] <= 0 or node.get("GPU", 0) >= resources["num_gpus"]
    )


def _gcs_address(address: str) -> str:
    if address.startswith("ray://"):  # Ray Client: probe its server's host:port
        return address.removeprefix("ray://")
    gcs = canonicalize_bootstrap_address(address)  # "auto": RAY_ADDRESS or the latest `ray start`
    if gcs is None:  # "local": Ray starts an instance itself
        raise ValueError("not a cluster address; leave run.ray_address empty for a local Ray")
    return gcs


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
