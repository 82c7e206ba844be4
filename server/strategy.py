"""Flower strategies with fedtrust's device selection and aggregation weights.

`DeviceSampling` is a mixin over Flower's own strategies (FedAvg, FedAdam): it only replaces
*which* nodes get a training message and *how much* each reply weighs; averaging, server
optimisers and message handling stay Flower's.

Under user-level DP (a `DPFedAvg` passed as `user_dp`) the mixin samples devices by Poisson
sampling and turns the replies into one clipped, noised mean update (`fedtrust.server.user_dp`)
BEFORE the server optimizer: Flower's strategy then gets a single synthetic reply carrying
global + noisy mean, so FedAvg moves to it and FedAdam uses the noisy mean as its
pseudo-gradient. The optimizer, moments included, only ever sees released (noised) means.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedtrust.errors import FederationError

from .registry import DeviceRegistry
from .selection import Selection, aggregation_weights
from .user_dp import DPFedAvg

WEIGHT_KEY = "agg-weight"


class ChosenNodes:
    """A view of the grid that shows only this round's chosen nodes to Flower's sampler."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@dataclass
class _Release:
    """The one reply Flower's strategy aggregates under user-level DP: global + noisy mean.

    Duck-types the parts of `Message` that Flower's `aggregate_train` reads (no error, content).
    """

    content: RecordDict

    def has_error(self) -> bool:
        return False


class DeviceSampling:
    """Mixin over a Flower strategy: fedtrust's settings are keyword arguments next to Flower's.

    `registry`: what the server knows about devices (filled by its check-in); `selection` and
    `devices_per_round`: who trains; `weighting`: how much each reply weighs
    (`fedtrust.server.selection.aggregation_weights`); `user_dp`: user-level DP-FedAvg, which
    replaces selection by Poisson sampling and the replies by one clipped, noised mean.
    """

    def __init__(
        self,
        *,
        registry: DeviceRegistry,
        selection: Selection,
        devices_per_round: int,
        weighting: str = "examples",
        seed: int = 0,
        user_dp: DPFedAvg | None = None,
        **flower_kwargs: Any,
    ) -> None:
        common = dict(
            fraction_train=1.0,  # fedtrust chooses the nodes; Flower trains all it is shown
            fraction_evaluate=0.0,  # evaluation is central, on the server's held-out split
            min_train_nodes=1,
            min_available_nodes=1,
            weighted_by_key=WEIGHT_KEY,
        )
        super().__init__(**(common | flower_kwargs))
        self.registry, self.selection = registry, selection
        self.devices_per_round, self.seed = devices_per_round, seed
        self.weighting = "equal" if user_dp is not None else weighting
        self.user_dp = user_dp
        self.last_selection: dict[str, list | int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.user_dp is not None:
            return self._configure_private(server_round, arrays, config, grid)
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
        if self.user_dp is not None:
            return self._aggregate_private(server_round, replies)
        ok = [m for m in replies if not m.has_error()]
        if not ok:
            _raise_all_failed(server_round, replies)
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

    def _configure_private(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """User-level DP: a Poisson sample; only its size goes into the run's metrics."""
        counts = self.registry.counts(server_round)
        sampled = self.user_dp.sample(self.selection, counts, server_round)
        self._sampled = {int(d) for d in sampled}
        self._global = arrays
        self.last_selection = {"devices_sampled": len(sampled)}
        # A sampled device without data has nothing to send: it counts as one that did not reply.
        nodes = [self.registry.node_of_device[int(d)] for d in sampled if counts[d] > 0]
        if not nodes:  # nobody to ask; the round still releases the noise-only update
            self._keep_global(arrays)
            return []
        return super().configure_train(server_round, arrays, config, ChosenNodes(grid, nodes))

    def _aggregate_private(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, sum, noise, divide by k; then the wrapped optimizer's step on that mean.

        No per-device metric (train loss, counts) is returned: the run folder is a release.
        """
        ok = [
            m
            for m in replies
            if not m.has_error() and int(m.content["device"]["device"]) in self._sampled
        ]
        if replies and not ok and all(m.has_error() for m in replies):
            _raise_all_failed(server_round, replies)
        ok.sort(key=lambda m: int(m.content["device"]["device"]))
        glob = {k: v.numpy() for k, v in self._global.items()}
        updates = [{k: a.numpy() for k, a in m.content[self.arrayrecord_key].items()} for m in ok]
        mean = self.user_dp.release(glob, updates, server_round)
        released = ArrayRecord(
            {k: Array(np.asarray(g + mean[k], dtype=g.dtype)) for k, g in glob.items()}
        )
        synthetic = _Release(
            RecordDict({"arrays": released, "metrics": MetricRecord({WEIGHT_KEY: 1.0})})
        )
        arrays, _ = super().aggregate_train(server_round, [synthetic])
        return arrays, None

    def _horvitz_thompson(self, averaged: ArrayRecord, total_weight: float) -> ArrayRecord:
        """Turn the normalised average into global + sum_i w_i * delta_i (unnormalised)."""
        out = {}
        for key, value in averaged.items():
            old = self._global[key].numpy()
            out[key] = Array(
                np.asarray(old + total_weight * (value.numpy() - old), dtype=old.dtype)
            )
        return ArrayRecord(out)

    def _keep_global(self, arrays: ArrayRecord) -> None:
        """A round without training messages: keep what the server optimizer needs."""

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """What a checkpoint must keep of the strategy (server-optimizer state, DP state)."""
        return self.user_dp.state() if self.user_dp is not None else {}

    def load_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        if self.user_dp is not None:
            self.user_dp.load_state(state)

    def privacy(self, server_round: int) -> dict[str, Any]:
        """ε so far with its δ, neighbouring relation and accountant ({} without DP):
        the server's mechanism (user level) or the devices' own reports (sample level)."""
        if self.user_dp is not None:
            return dict(self.user_dp.epsilon(server_round))
        return self.registry.ledger.summary()

    def one_run_audit(self, rounds: int) -> dict[str, Any] | None:
        """Claimed vs audited ε when user-level DP planted canary devices, else None."""
        return self.user_dp.one_run_audit(rounds) if self.user_dp is not None else None


class SampledFedAvg(DeviceSampling, FedAvg):
    """Flower's FedAvg with fedtrust's device selection, weights and optional user-level DP."""


class SampledFedAdam(DeviceSampling, FedAdam):
    """Flower's FedAdam (server-side Adam on the mean update) with fedtrust's selection."""

    def _keep_global(self, arrays: ArrayRecord) -> None:
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}  # as FedOpt would

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        moments = {name: value for name in ("m_t", "v_t") if (value := getattr(self, name))}
        return super().state() | moments

    def load_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        super().load_state(state)
        self.m_t, self.v_t = state.get("m_t"), state.get("v_t")


def _raise_all_failed(server_round: int, replies: list[Message]) -> None:
    reasons = "; ".join(sorted({m.error.reason.strip().splitlines()[-1] for m in replies}))
    raise FederationError(f"round {server_round}: every device failed: {reasons}")
