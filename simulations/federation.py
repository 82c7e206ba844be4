"""From a run config to the federation's parts: the strategy, what devices are told, the apps.

The one place that knows how config sections map onto `fedtrust.server` and `fedtrust.clients`
(which never see the config themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord

from fedtrust.clients.budget import planned_participations
from fedtrust.clients.settings import DeviceDP, TrainInstructions
from fedtrust.compression import CompressionSettings
from fedtrust.server.finetune import CohortFinetune
from fedtrust.server.qffl import SampledQFedAvg
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.reweighting import AdversarialReweighting
from fedtrust.server.robust import ROBUST
from fedtrust.server.selection import ActivitySelection, Selection, UniformSelection
from fedtrust.server.strategy import DeviceSampling, SampledFedAdam, SampledFedAvg
from fedtrust.server.user_dp import DPFedAvg

from .config import Config, MitigationConfig, SelectionConfig, needs_device_losses


def make_selection(selection: SelectionConfig) -> Selection:
    if selection.strategy == "activity":
        beta_end = selection.beta_end if selection.beta_end >= 0 else None
        return ActivitySelection(selection.beta, floor=selection.floor, beta_end=beta_end)
    return UniformSelection()


@dataclass(frozen=True)
class WorstActivityCohort:
    """The server's cohort discovery for fine-tuning, over what it knows of every device (its
    example count and last reported loss): the activity range (`<= t` or `> t`, t at quantiles)
    holding at most `max_share` of the devices whose mean loss exceeds the rest's the most, with
    at least `min_devices` devices that reported a loss on each side (up-weighting most of the
    population is just another selection). Devices that never reported a loss are members when
    their activity falls in the range; empty when no range qualifies."""

    min_devices: int
    max_share: float = 0.25

    def __call__(self, counts: np.ndarray, losses: np.ndarray) -> np.ndarray:
        counts, losses = np.asarray(counts, float), np.asarray(losses, float)
        scored = np.isfinite(losses)
        best, best_gap = np.zeros(len(counts), bool), 0.0
        for t in np.unique(np.quantile(counts, np.linspace(0.02, 0.98, 49))):
            for mask in (counts <= t, counts > t):
                inside, rest = losses[mask & scored], losses[~mask & scored]
                if mask.mean() > self.max_share or min(len(inside), len(rest)) < self.min_devices:
                    continue
                if (gap := inside.mean() - rest.mean()) > best_gap:
                    best, best_gap = mask, gap
        return best


def mitigations(cfg: Config) -> dict:
    """The strategy's loss-aware mitigation arguments (`[mitigation]`)."""
    m: MitigationConfig = cfg.mitigation
    out: dict = {"total_rounds": cfg.server.rounds}
    if m.reweighting == "adversarial":
        out["reweighting"] = AdversarialReweighting(step=m.arw_step, bound=m.arw_bound)
    if m.finetune_rounds > 0:
        out["finetune"] = CohortFinetune(
            rounds=m.finetune_rounds,
            upweight=m.finetune_upweight,
            ewc_lambda=m.ewc_lambda,
            find_worst=WorstActivityCohort(cfg.cohorts.min_devices, m.finetune_max_share),
        )
    return out


def user_level_dp(cfg: Config, num_devices: int) -> DPFedAvg | None:
    """DP-FedAvg on the server when `privacy.level = "user"` (and DP is on), else None."""
    p = cfg.privacy
    if not (p.enabled and p.level == "user"):
        return None
    return DPFedAvg.create(
        num_devices=num_devices,
        devices_per_round=cfg.selection.devices_per_round,
        clip=p.max_grad_norm,
        rounds=cfg.server.rounds,
        noise_multiplier=p.noise_multiplier,
        target_epsilon=p.target_epsilon,
        target_delta=p.target_delta,
        max_inclusion=p.max_inclusion,
        activity_reference=p.activity_reference,
        activity=cfg.selection.strategy == "activity",
        accountant=p.accountant,
        seed=cfg.run.seed,
        reproducible=p.reproducible_noise,
        audit_canaries=p.audit_canaries,
    )


def make_strategy(cfg: Config, registry: DeviceRegistry, num_devices: int) -> DeviceSampling:
    """Flower's FedAvg, FedAdam, QFedAvg or a robust aggregation (`server.aggregation`) with
    fedtrust's selection, DP, fairness mitigations and reply screening."""
    common = dict(
        registry=registry,
        selection=make_selection(cfg.selection),
        devices_per_round=cfg.selection.devices_per_round,
        weighting=cfg.selection.weighting,
        seed=cfg.run.seed,
        user_dp=user_level_dp(cfg, num_devices),
        min_replies=cfg.server.min_replies,
        max_update_norm=cfg.server.max_update_norm,
        compression=compression(cfg),
        **mitigations(cfg),
    )
    s = cfg.server
    if s.aggregation in ("krum", "multikrum", "bulyan"):
        return ROBUST[s.aggregation](**common, num_malicious_nodes=s.malicious)
    if s.aggregation == "fedtrimmedavg":
        return ROBUST[s.aggregation](**common, beta=s.trim_beta)
    if s.aggregation == "fedmedian":
        return ROBUST[s.aggregation](**common)
    if s.aggregation == "fedadam":
        return SampledFedAdam(
            **common,
            eta=s.server_lr,
            eta_l=cfg.client.lr,
            beta_1=s.beta_1,
            beta_2=s.beta_2,
            tau=s.tau,
        )
    if s.aggregation == "qfedavg":
        return SampledQFedAvg(**common, q=s.q, client_learning_rate=s.qffl_lr or cfg.client.lr)
    return SampledFedAvg(**common)


def device_instructions(cfg: Config, run_dir: Path, num_devices: int) -> ConfigRecord:
    """What every training message tells a device (`fedtrust.clients.settings`)."""
    p = cfg.privacy
    dp = None
    if p.enabled and p.level == "sample":
        planned = p.participations or planned_participations(
            cfg.server.rounds, cfg.selection.devices_per_round, num_devices
        )
        dp = DeviceDP(
            max_grad_norm=p.max_grad_norm,
            participations=planned,
            target_epsilon=p.target_epsilon,
            target_delta=p.target_delta,
            noise_multiplier=p.noise_multiplier,
            clipping=p.clipping,
            accountant=p.accountant,
            reproducible_noise=p.reproducible_noise,
        )
    instructions = TrainInstructions(
        client=cfg.client,
        seed=cfg.run.seed,
        state_dir=str(Path(run_dir).resolve()),  # absolute: devices may run elsewhere
        dp=dp,
        report_loss=not p.enabled,  # under user-level DP the loss is not covered either
        global_loss=needs_device_losses(cfg),
        faults=cfg.faults if cfg.faults.any else None,
        compression=compression(cfg),
    )
    return instructions.to_record()


def compression(cfg: Config) -> CompressionSettings | None:
    """How updates travel (`[compression]`); None: dense float tensors, as Flower sends them."""
    return cfg.compression if cfg.compression.method != "none" else None
