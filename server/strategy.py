"""Flower strategies with fedtrust's device selection and aggregation weights.

`DeviceSampling` is a mixin over Flower's own strategies (FedAvg, FedAdam, QFedAvg): it only
replaces *which* nodes get a training message and *how much* each reply weighs; averaging,
server optimisers and message handling stay Flower's.

Loss-aware fairness mitigations read each device's loss at the global model (its
"global_loss" metric, which devices send when told to): q-FFL (`fedtrust.server.qffl`), adversarial
reweighting of the replies (`fedtrust.server.reweighting`) and a cohort fine-tuning phase under
an EWC anchor (`fedtrust.server.finetune`). None of them runs under user-level DP.

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

from fedtrust.compression import CompressionSettings
from fedtrust.errors import FederationError

from .downlink import Downlink
from .finetune import FISHER_KEY, CohortFinetune, Upweighted, average_fisher, take_fisher
from .registry import DeviceRegistry
from .replies import Failure, TooFewReplies, bound_update, describe, screen_replies
from .reweighting import AdversarialReweighting
from .selection import Selection, aggregation_weights
from .user_dp import DPFedAvg
from .wire import UpdateDecoder

WEIGHT_KEY = "agg-weight"
LOSS_KEY = "global_loss"  # a device's mean loss at the round's global model, before training


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
    `total_rounds`: the run's length, for the selection's schedule (`Selection.at_round`) and
    fine-tuning (0: unknown; the selection is then used as it is). `reweighting`: the replies'
    weights times an adversary's bounded multipliers from their "global_loss". `finetune`: the
    last rounds up-weight the worst cohort under an EWC anchor.

    The strategy remembers every device's last reported "global_loss" (`state()` keeps it, the
    cohort and the averaged Fisher, so a resumed run continues exactly).
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
        reweighting: AdversarialReweighting | None = None,
        finetune: CohortFinetune | None = None,
        total_rounds: int = 0,
        min_replies: int = 1,
        max_update_norm: float = 0.0,
        compression: CompressionSettings | None = None,
        **flower_kwargs: Any,
    ) -> None:
        if reweighting is not None and (user_dp is not None or weighting == "unbiased"):
            raise ValueError(
                "adversarial reweighting needs the devices' losses and normalised weights: "
                "not with user-level DP nor with weighting 'unbiased'"
            )
        if finetune is not None:
            if user_dp is not None:
                raise ValueError("cohort fine-tuning reads devices' losses: not with user-level DP")
            finetune.check(total_rounds)
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
        self.reweighting, self.finetune, self.total_rounds = reweighting, finetune, total_rounds
        self.min_replies, self.max_update_norm = min_replies, max_update_norm
        self.compression = compression if compression and compression.method != "none" else None
        self.downlink = Downlink() if self.compression is not None else None
        self.round_timeout = 0.0  # the loop's wait for replies, for the failures it names
        self.attempt = 0  # the round's retry (set by the round loop): a fresh selection
        # devices not to ask now (set by the round loop): still busy with a message the server
        # gave up on, or failed in an earlier attempt of this round
        self.unavailable: set[int] = set()
        self.last_selection: dict[str, list | int] = {}
        self.last_failures: list[Failure] = []
        self._expected: dict[int, int] = {}  # node -> device asked to train this round
        self._losses: dict[int, float] = {}  # device -> its last reported global_loss
        self._cohort: np.ndarray | None = None  # the fine-tuning phase's cohort, once named
        self._fisher: dict[str, np.ndarray] | None = None  # the averaged Fisher diagonal

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.user_dp is not None:
            return self._configure_private(server_round, arrays, config, grid)
        counts = self.registry.counts(server_round)
        if self.unavailable:
            counts = counts.copy()
            counts[sorted(self.unavailable)] = 0
        selection = self._selection_at(server_round)
        if phase := self._in_phase(server_round):
            if self._cohort is None:
                self._cohort = self.finetune.cohort(counts, self.device_losses())
            selection = Upweighted(selection, self._cohort, self.finetune.upweight)
        key = [self.seed, server_round] + ([self.attempt] if self.attempt else [])
        rng = np.random.default_rng(key)
        chosen, inclusion = selection.select(counts, self.devices_per_round, rng)
        weights = aggregation_weights(self.weighting, counts, chosen, inclusion)
        self._weight_of = {int(d): float(w) for d, w in zip(chosen, weights)}
        self._global = arrays
        self.last_selection = {
            "devices": [int(d) for d in chosen],
            "available": [int(counts[d]) for d in chosen],
            "inclusion": [float(inclusion[d]) for d in chosen],
        }
        if phase:
            self.last_selection |= {
                "cohort_chosen": int(self._cohort[chosen].sum()),
                "cohort_size": int(self._cohort.sum()),
            }
        fisher = None
        if self.finetune is not None:
            fields, fisher = self.finetune.fields(server_round, self.total_rounds, self._fisher)
            config.update(fields)
        nodes = [self.registry.node_of_device[int(d)] for d in chosen]
        self._expected = {n: int(d) for n, d in zip(nodes, chosen)}
        messages = list(
            super().configure_train(server_round, arrays, config, ChosenNodes(grid, nodes))
        )
        if fisher is not None:
            for msg in messages:
                msg.content[FISHER_KEY] = fisher
        if self.downlink is not None:
            self.downlink.rewrite(messages, self._expected, server_round - 1, arrays)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Sorted by device: a fixed order makes the floating-point sum, and so a resumed run,
        # reproducible.
        decode = UpdateDecoder.for_round(self._global, self.compression, self.seed, server_round)
        ok, self.last_failures, identified = screen_replies(
            replies, self._expected, self._global, self.round_timeout, decode
        )
        self.registry.update(identified)  # a dropped reply's budget report still counts
        if self.downlink is not None:
            self.downlink.answered(server_round - 1, identified, self.last_failures)
        if self.user_dp is not None:  # a dropped reply counts as a device that sent nothing
            return self._aggregate_private(server_round, ok)
        if len(ok) < self.min_replies:
            raise TooFewReplies(server_round, len(ok), self.min_replies, self.last_failures)
        if self.max_update_norm > 0:
            for msg in ok:
                msg.content[self.arrayrecord_key] = bound_update(
                    msg.content[self.arrayrecord_key], self._global, self.max_update_norm
                )
        self._keep_fisher(server_round, ok)  # Flower's strategies expect one ArrayRecord
        for msg in ok:
            device = int(msg.content["device"]["device"])
            msg.content["metrics"][WEIGHT_KEY] = self._weight_of[device]
            if LOSS_KEY in msg.content["metrics"]:  # finite: screen_replies dropped the rest
                self._losses[device] = float(msg.content["metrics"][LOSS_KEY])
        if self.reweighting is not None:
            self._reweight(ok)
        arrays, metrics = self._flower_aggregate(server_round, ok)
        if arrays is None:  # Flower's strategy had too few replies for its rule
            raise TooFewReplies(server_round, len(ok), len(ok) + 1, self.last_failures)
        if self.downlink is not None:
            self.downlink.aggregated(server_round, ok)
        if self.weighting == "unbiased":
            arrays = self._horvitz_thompson(
                arrays, sum(self._weight_of[int(m.content["device"]["device"])] for m in ok)
            )
        return arrays, metrics

    def _flower_aggregate(
        self, server_round: int, ok: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped Flower strategy's aggregation of the screened replies."""
        return super().aggregate_train(server_round, ok)

    def device_losses(self) -> np.ndarray:
        """Each device's last reported loss at the global model (NaN: never reported)."""
        losses = np.full(self.registry.size, np.nan)
        for device, loss in self._losses.items():
            losses[device] = loss
        return losses

    def _in_phase(self, server_round: int) -> bool:
        return self.finetune is not None and self.finetune.in_phase(server_round, self.total_rounds)

    def _selection_at(self, server_round: int) -> Selection:
        if not self.total_rounds:
            return self.selection
        return self.selection.at_round(server_round, self.total_rounds)

    def _keep_fisher(self, server_round: int, ok: list[Message]) -> None:
        """Strip the replies' Fisher records; in the Fisher round, keep their weighted mean."""
        fishers = take_fisher([m.content for m in ok])
        if self.finetune is None or server_round != self.finetune.fisher_round(self.total_rounds):
            return
        if len(fishers) != len(ok):
            raise FederationError(
                f"round {server_round}: {len(ok) - len(fishers)} replies lack the Fisher diagonal"
            )
        self._fisher = average_fisher(fishers)

    def _reweight(self, ok: list[Message]) -> None:
        """The adversary's multipliers from the replies' losses, on their aggregation weights."""
        missing = [m for m in ok if LOSS_KEY not in m.content["metrics"]]
        if missing:
            raise FederationError(
                f"adversarial reweighting needs every reply's '{LOSS_KEY}' metric: tell devices "
                "to report it (TrainInstructions.global_loss)"
            )
        losses = np.array([float(m.content["metrics"][LOSS_KEY]) for m in ok])
        base = np.array([float(m.content["metrics"][WEIGHT_KEY]) for m in ok])
        for msg, weight in zip(ok, self.reweighting.weights(base, losses)):
            msg.content["metrics"][WEIGHT_KEY] = float(weight)
        self.last_selection["adversary"] = [float(x) for x in self.reweighting.multipliers(losses)]

    def _configure_private(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """User-level DP: a Poisson sample; only its size goes into the run's metrics."""
        counts = self.registry.counts(server_round)
        sampled = self.user_dp.sample(self._selection_at(server_round), counts, server_round)
        self._sampled = {int(d) for d in sampled}
        self._global = arrays
        self.last_selection = {"devices_sampled": len(sampled)}
        # A sampled device without data has nothing to send: it counts as one that did not reply.
        self._expected = {
            self.registry.node_of_device[int(d)]: int(d)
            for d in sampled
            if counts[d] > 0 and int(d) not in self.unavailable  # busy: counts as no reply
        }
        nodes = list(self._expected)
        if not nodes:  # nobody to ask; the round still releases the noise-only update
            self._keep_global(arrays)
            return []
        messages = list(
            super().configure_train(server_round, arrays, config, ChosenNodes(grid, nodes))
        )
        if self.downlink is not None:
            self.downlink.rewrite(messages, self._expected, server_round - 1, arrays)
        return messages

    def _aggregate_private(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, sum, noise, divide by k; then the wrapped optimizer's step on that mean.

        No per-device metric (train loss, counts) is returned: the run folder is a release.
        """
        ok = [m for m in replies if int(m.content["device"]["device"]) in self._sampled]
        failed = self.last_failures
        if not ok and failed and all(f.reason.startswith("raised:") for f in failed):
            # every device asked raised: a broken federation, not noise worth releasing
            raise FederationError(f"round {server_round}: every device failed: {describe(failed)}")
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
        if self.downlink is not None:
            self.downlink.aggregated(server_round, ok)
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
        """What a checkpoint must keep of the strategy (server-optimizer state, DP state, the
        devices' last losses, the fine-tuning cohort and Fisher diagonal)."""
        state = self.user_dp.state() if self.user_dp is not None else {}
        fairness: dict[str, np.ndarray] = {}
        if self._losses:
            devices = sorted(self._losses)
            fairness["devices"] = np.array(devices, dtype=np.int64)
            fairness[LOSS_KEY] = np.array([self._losses[d] for d in devices], dtype=np.float64)
        if self._cohort is not None:
            fairness["cohort"] = self._cohort.copy()
        if fairness:
            state["fairness"] = fairness
        if self._fisher is not None:
            state[FISHER_KEY] = dict(self._fisher)
        if self.downlink is not None:
            state["downlink"] = self.downlink.state()
        return state

    def load_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        if self.user_dp is not None:
            self.user_dp.load_state(state)
        fairness = state.get("fairness", {})
        devices, losses = fairness.get("devices", []), fairness.get(LOSS_KEY, [])
        self._losses = {int(d): float(x) for d, x in zip(devices, losses)}
        cohort = fairness.get("cohort")
        self._cohort = None if cohort is None else np.asarray(cohort, dtype=bool)
        fisher = state.get(FISHER_KEY)
        self._fisher = None if fisher is None else dict(fisher)
        if self.downlink is not None:
            self.downlink.load_state(state.get("downlink", {}))

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
