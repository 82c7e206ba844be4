"""What the server tells a device with every training message, as typed settings.

The static settings (the same every round) travel as one Flower `ConfigRecord` of flat
`section.key` fields; the server adds the round number and forwards the record without reading
it (it never imports this module: clients and server only share Flower messages).

Per-round requests the server's strategy adds to the same record (`FinetuneRequest`): "fisher"
(True: also return the Fisher diagonal of the received model as ArrayRecord "fisher") and
"ewc-lambda" (the EWC penalty's strength; the message then carries ArrayRecord "fisher").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from flwr.app import ConfigRecord

from fedtrust.compression import CompressionSettings

from .faults import FaultSettings


@dataclass
class ClientSettings:
    """Local training on a device (the `[client]` section of a run config)."""

    epochs: int = 2
    steps: int = 0  # > 0: a fixed number of local steps instead of epochs
    batch_size: int = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-4
    head_lr_scale: float = 20.0  # the new classifier head learns this many times faster
    weight_decay: float = 0.0
    num_cpus: int = 2  # torch threads on the device (and Ray CPUs per simulated device)
    num_gpus: float = 0.0  # Ray GPUs per simulated device


@dataclass(frozen=True)
class DeviceDP:
    """Sample-level DP: the public settings every device applies to its own examples."""

    max_grad_norm: float
    participations: int  # participations the device budgets for
    target_epsilon: float = 0.0  # > 0: noise calibrated to spend it over `participations`
    target_delta: float = 0.0  # 0 = default_delta(the device's example count)
    noise_multiplier: float = 0.0  # used as given when target_epsilon = 0
    clipping: Literal["flat", "automatic"] = "flat"
    accountant: Literal["pld", "rdp", "prv"] = "pld"
    reproducible_noise: bool = False


@dataclass(frozen=True)
class TrainInstructions:
    client: ClientSettings
    seed: int
    state_dir: str  # where devices keep their budgets unless the node config has `state-dir`
    dp: DeviceDP | None = None
    report_loss: bool = True  # False when the loss is not covered by a DP mechanism
    # True: before training, report the received global model's mean loss on the device's rows
    # (metric "global_loss": what q-FFL, reweighting and cohort fine-tuning read); never under
    # DP, where no mechanism covers it
    global_loss: bool = False
    faults: FaultSettings | None = None  # simulated faults to inject (robustness studies)
    compression: CompressionSettings | None = None  # how the update is sent (None: dense)

    def __post_init__(self) -> None:
        if self.global_loss and self.dp is not None:
            raise ValueError("global_loss is not covered by DP: a device under DP cannot report it")

    def to_record(self) -> ConfigRecord:
        fields: dict[str, Any] = {
            "seed": self.seed,
            "state-dir": self.state_dir,
            "report-loss": self.report_loss,
            "global-loss": self.global_loss,
        }
        fields |= {f"client.{k}": v for k, v in dataclasses.asdict(self.client).items()}
        if self.dp is not None:
            fields |= {f"dp.{k}": v for k, v in dataclasses.asdict(self.dp).items()}
        if self.faults is not None:
            fields |= {f"faults.{k}": v for k, v in dataclasses.asdict(self.faults).items()}
        if self.compression is not None:
            fields |= {
                f"compression.{k}": v for k, v in dataclasses.asdict(self.compression).items()
            }
        return ConfigRecord(fields)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstructions:
        dp, faults = _section(record, "dp."), _section(record, "faults.")
        compression = _section(record, "compression.")
        return cls(
            client=ClientSettings(**_section(record, "client.")),
            seed=int(record["seed"]),
            state_dir=str(record["state-dir"]),
            dp=DeviceDP(**dp) if dp else None,
            report_loss=bool(record["report-loss"]),
            global_loss=bool(record.get("global-loss", False)),
            faults=FaultSettings(**faults) if faults else None,
            compression=CompressionSettings(**compression) if compression else None,
        )


def _section(record: ConfigRecord, prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class FinetuneRequest:
    """What this round's message asks of cohort fine-tuning (`fedtrust.server.finetune`)."""

    fisher: bool = False  # return the Fisher diagonal at the received global model
    ewc_lambda: float | None = None  # add the EWC penalty (the message carries the Fisher)

    @classmethod
    def from_record(cls, record: ConfigRecord, dp: DeviceDP | None) -> FinetuneRequest:
        ewc = record.get("ewc-lambda")
        request = cls(bool(record.get("fisher", False)), None if ewc is None else float(ewc))
        if dp is not None and (request.fisher or request.ewc_lambda is not None):
            raise ValueError("the Fisher diagonal and EWC are not covered by DP: not under DP")
        return request
