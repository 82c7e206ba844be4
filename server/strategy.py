"""Flower strategies with fedtrust's device selection and aggregation weights.

`DeviceSampling` is a mixin over Flower's own strategies (FedAvg, FedAdam): it only replaces
*which* nodes get a training message and *how much* each reply weighs; averaging, server
optimisers and message handling stay Flower's.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg

from .registry import DeviceRegistry
from .selection import Selection, aggregation_weights

WEIGHT_KEY = "agg-weight"


class ChosenNodes:
    """A view of the grid that shows only this round's chosen nodes to Flower's sampler."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class DeviceSampling:
    """Mixin: call `attach(...)` before the first round."""

    def attach(
        self,
        registry: DeviceRegistry,
        selection: Selection,
        devices_per_round: int,
        weighting: str,
        seed: int,
    ) -> None:
        self.registry, self.selection = registry, selection
        self.devices_per_round, self.weighting, self.seed = devices_per_round, weighting, seed
        self.last_selection: dict[str, list] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        counts = self.registry.counts(server_round)
        rng = np.random.default_rng([self.seed, server_round])
        chosen, inclusion = self.selection.select(counts, self.devices_per_round, rng)
        weights = aggregation_weights(self.weighting, counts, chosen, inclusion)
        self._weight_of = {int(d): float(w) for d, w in zip(chosen, weights)}
        self._global = arrays
        self.last_selection = {
            "devices": [int(d) for d in chosen],
            "available": [int(counts[d]) for d in chosen],
            "inclusion": [float(inclusion[d]) for d in chosen],
        }
        nodes = [self.registry.node_of_device[int(d)] for d in chosen]
        return super().configure_train(server_round, arrays, config, ChosenNodes(grid, nodes))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.registry.update(replies)
        ok = [m for m in replies if not m.has_error()]
        if not ok:
            reasons = "; ".join(sorted({m.error.reason.strip().splitlines()[-1] for m in replies}))
            raise RuntimeError(f"round {server_round}: every device failed: {reasons}")
        # A fixed order makes the floating-point sum, and so a resumed run, reproducible.
        ok.sort(key=lambda m: int(m.content["device"]["device"]))
        for msg in ok:
            device = int(msg.content["device"]["device"])
            msg.content["metrics"][WEIGHT_KEY] = self._weight_of[device]
        arrays, metrics = super().aggregate_train(server_round, ok)
        if arrays is not None and self.weighting == "unbiased":
            arrays = self._horvitz_thompson(
                arrays, sum(self._weight_of[int(m.content["device"]["device"])] for m in ok)
            )
        return arrays, metrics

    def _horvitz_thompson(self, averaged: ArrayRecord, total_weight: float) -> ArrayRecord:
        """Turn the normalised average into global + sum_i w_i * delta_i (unnormalised)."""
        out = {}
        for key, value in averaged.items():
            old = self._global[key].numpy()
            out[key] = Array(
                np.asarray(old + total_weight * (value.numpy() - old), dtype=old.dtype)
            )
        return ArrayRecord(out)

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """Optimizer state a checkpoint must keep (FedAdam moments)."""
        return {k: v for k in ("m_t", "v_t") if (v := getattr(self, k, None))}

    def load_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class SampledFedAvg(DeviceSampling, FedAvg):
    pass


class SampledFedAdam(DeviceSampling, FedAdam):
    pass


def make_strategy(cfg, registry: DeviceRegistry, selection: Selection) -> DeviceSampling:
    """Build the strategy named by cfg.server.aggregation (a Config)."""
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,  # evaluation is central, on the server's held-out split
        min_train_nodes=1,
        min_available_nodes=1,
        weighted_by_key=WEIGHT_KEY,
    )
    if cfg.server.aggregation == "fedadam":
        strategy: DeviceSampling = SampledFedAdam(
            **common,
            eta=cfg.server.server_lr,
            eta_l=cfg.client.lr,
            beta_1=cfg.server.beta_1,
            beta_2=cfg.server.beta_2,
            tau=cfg.server.tau,
        )
    else:
        strategy = SampledFedAvg(**common)
    strategy.attach(
        registry, selection, cfg.selection.devices_per_round, cfg.selection.weighting, cfg.run.seed
    )
    return strategy
