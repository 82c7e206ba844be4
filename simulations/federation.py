"""From a run config to the federation's parts: the strategy, what devices are told, the apps.

The one place that knows how config sections map onto `fedtrust.server` and `fedtrust.clients`
(which never see the config themselves).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord

from fedtrust.clients.budget import planned_participations
from fedtrust.clients.settings import DeviceDP, TrainInstructions
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.selection import ActivitySelection, Selection, UniformSelection
from fedtrust.server.strategy import DeviceSampling, SampledFedAdam, SampledFedAvg
from fedtrust.server.user_dp import DPFedAvg

from .config import Config, SelectionConfig


def make_selection(selection: SelectionConfig) -> Selection:
    if selection.strategy == "activity":
        return ActivitySelection(selection.beta)
    return UniformSelection()


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
    """Flower's FedAvg or FedAdam (`server.aggregation`) with fedtrust's selection and DP."""
    common = dict(
        registry=registry,
        selection=make_selection(cfg.selection),
        devices_per_round=cfg.selection.devices_per_round,
        weighting=cfg.selection.weighting,
        seed=cfg.run.seed,
        user_dp=user_level_dp(cfg, num_devices),
    )
    s = cfg.server
    if s.aggregation == "fedadam":
        return SampledFedAdam(
            **common,
            eta=s.server_lr,
            eta_l=cfg.client.lr,
            beta_1=s.beta_1,
            beta_2=s.beta_2,
            tau=s.tau,
        )
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
        state_dir=str(run_dir),
        dp=dp,
        report_loss=not p.enabled,  # under user-level DP the loss is not covered either
    )
    return instructions.to_record()
