"""Simulated device faults, for robustness studies: crashes, stragglers, garbage and attacks.

Real devices fail: they drop out, time out, send corrupt weights or lie. A simulation can inject
each of these (the run config's `[faults]` section, all off by default) to check that the server
survives them (`fedtrust.server.replies` drops what it cannot use; robust aggregation and update
norm bounds limit what a lying device can do). Every fault is drawn from the run seed, the round
and the device, so a run with faults is as reproducible, and resumable, as one without.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch


class DeviceCrash(RuntimeError):
    """A simulated device crash (the device raises instead of replying)."""


@dataclass
class FaultSettings:
    """The `[faults]` section: per selected device and round, the chance of each fault."""

    crash: float = 0.0  # raises instead of replying (Flower returns an error reply)
    slow: float = 0.0  # sleeps `slow_seconds` before replying (a straggler; see round_timeout)
    slow_seconds: float = 0.0
    nan: float = 0.0  # replies with NaN in its weights
    malformed: float = 0.0  # replies with a tensor of the wrong shape and one key missing
    nan_metric: float = 0.0  # reports a NaN training loss
    byzantine: int = 0  # devices 0 .. byzantine-1 always send a malicious update
    attack: Literal["sign-flip", "scale"] = "sign-flip"  # the malicious update: -s*u or s*u
    attack_scale: float = 10.0  # s, times the honest update u = trained - received

    @property
    def any(self) -> bool:
        return bool(
            self.crash or self.slow or self.nan or self.malformed or self.nan_metric
            or self.byzantine
        )  # fmt: skip


class FaultInjector:
    """The faults of one device in one round, drawn once from (seed, round, device)."""

    def __init__(self, settings: FaultSettings, seed: int, server_round: int, device: int) -> None:
        self.settings, self.device = settings, device
        u = np.random.default_rng([seed, server_round, device, 0xFA17]).random(5)
        s = settings
        self.crashes, self.slow = u[0] < s.crash, u[1] < s.slow
        self.nan, self.malformed = u[2] < s.nan, u[3] < s.malformed
        self.nan_metric = u[4] < s.nan_metric
        self.byzantine = device < s.byzantine

    def before_training(self) -> None:
        """Crash or straggle before doing any work."""
        if self.slow and self.settings.slow_seconds > 0:
            time.sleep(self.settings.slow_seconds)
        if self.crashes:
            raise DeviceCrash(f"device {self.device}: simulated crash (faults.crash)")

    def corrupt_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics the device actually reports."""
        return {**metrics, "train_loss": float("nan")} if self.nan_metric else metrics

    def corrupt(
        self, trained: dict[str, torch.Tensor], received: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The weights the device actually sends back."""
        out = dict(trained)
        if self.byzantine:
            sign = -1.0 if self.settings.attack == "sign-flip" else 1.0
            scale = sign * self.settings.attack_scale
            out = {k: received[k] + scale * (v - received[k]) for k, v in out.items()}
        if self.nan:
            key = next(iter(out))
            out[key] = out[key].clone()
            out[key].view(-1)[0] = float("nan")
        if self.malformed:  # one tensor missing, another of the wrong shape
            keys = list(out)
            out.pop(keys[0])
            if len(keys) > 1:
                out[keys[1]] = torch.zeros(3, 1)
        return out
