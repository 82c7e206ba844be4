"""Flower strategies with fedtrust's device selection and aggregation weights.

`DeviceSampling` is a mixin over Flower's own strategies (FedAvg, FedAdam): it only replaces
*which* nodes get a training message and *how much* each reply weighs; averaging, server
optimisers and message handling stay Flower's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
)

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
        if self.registry.privacy or self.registry.max_participations:
            config = ConfigRecord(dict(config))
            config["privacy-devices"] = json.dumps(self.registry.privacy_state(chosen))
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


class UserLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """DP-FedAvg: Flower's server-side fixed clipping + Gaussian noise, with an Opacus accountant.

    Each device's update is clipped to norm C, the clipped updates are averaged with equal
    weights, and N(0, (sigma C / k)^2) noise is added (Flower's wrapper). Flower's own accountant
    only covers releases without subsampling; fedtrust accounts the subsampled Gaussian
    mechanism with Opacus (RDP/PRV) at sampling rate q = devices_per_round / devices.
    """

    def __init__(
        self,
        strategy: DeviceSampling,
        noise_multiplier: float,
        clip: float,
        per_round: int,
        sample_rate: float,
        delta: float,
        accountant: str,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clip, per_round)
        self.sample_rate, self.delta, self.accountant_name = sample_rate, delta, accountant

    @property
    def last_selection(self) -> dict[str, list]:
        return self.strategy.last_selection

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return self.strategy.state()

    def load_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        self.strategy.load_state(state)

    def epsilon(self, rounds: int) -> dict[str, float]:
        from fedtrust.privacy import compute_epsilon

        history = [(self.noise_multiplier, self.sample_rate, rounds)]
        return {
            "epsilon": compute_epsilon(history, self.delta, self.accountant_name),
            "noise_multiplier": self.noise_multiplier,
        }


def make_strategy(cfg, registry: DeviceRegistry, selection: Selection) -> DeviceSampling:
    """Build the strategy named by cfg.server.aggregation (a Config), with DP if configured."""
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
    privacy = cfg.privacy
    user_dp = privacy.enabled and privacy.level == "user"
    weighting = "equal" if user_dp else cfg.selection.weighting
    strategy.attach(registry, selection, cfg.selection.devices_per_round, weighting, cfg.run.seed)
    if privacy.enabled and privacy.level == "sample" and privacy.target_epsilon > 0:
        registry.max_participations = privacy.participations or planned_participations(
            cfg, registry.size
        )
    if not user_dp:
        return strategy
    return _user_level(cfg, strategy, registry.size)


def planned_participations(cfg, num_devices: int) -> int:
    """Sample-level DP: twice the expected participations of a device under uniform sampling."""
    expected = cfg.server.rounds * cfg.selection.devices_per_round / num_devices
    return max(1, math.ceil(2 * expected))


def _user_level(cfg, strategy: DeviceSampling, num_devices: int) -> UserLevelDP:
    from fedtrust.privacy import calibrate_noise

    p, k = cfg.privacy, cfg.selection.devices_per_round
    q = k / num_devices
    if cfg.selection.strategy == "activity":
        # The guarantee is stated for the device sampled most often: its inclusion probability.
        weights = strategy.selection.weights(np.asarray(strategy.registry.counts(1), dtype=float))
        q = float(strategy.selection.inclusion_probabilities(weights, k).max())
    delta = p.target_delta or 1 / (10 * num_devices)
    sigma = p.noise_multiplier
    if p.target_epsilon > 0:
        sigma = calibrate_noise(p.target_epsilon, delta, q, cfg.server.rounds, p.accountant)
    return UserLevelDP(strategy, sigma, p.max_grad_norm, k, q, delta, p.accountant)
