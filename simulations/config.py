"""The run configuration: typed sections, TOML loading, `--set key=value` overrides, validation.

Only `fedtrust.simulations` reads it: lower layers get the typed section or values they need.

Every error names the file (or `--set`), the key and the value, in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedtrust.clients.device_data import StorageSettings
from fedtrust.clients.faults import FaultSettings
from fedtrust.clients.settings import ClientSettings
from fedtrust.compression import CompressionSettings
from fedtrust.errors import ConfigError
from fedtrust.tasks import TaskSpec

from .config_files import Sections, apply, load_sections, parse_override, requirement

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "parse_override"]

BUNDLED = Path(__file__).parent / "configs"

# The sections a library owns are its own typed settings (TaskSpec, StorageSettings,
# ClientSettings, CompressionSettings); the others only make sense for an experiment and live here.


@dataclass
class PartitionConfig:
    scheme: Literal["natural", "iid", "dirichlet", "powerlaw"] = "iid"
    num_devices: int = 100
    alpha: float = 0.5  # Dirichlet concentration (smaller = more label skew)
    exponent: float = 1.5  # Pareto shape of device sizes (smaller = more skew)
    min_examples: int = 1  # natural partitions: devices with fewer examples are dropped


@dataclass
class SelectionConfig:
    strategy: Literal["uniform", "activity"] = "uniform"
    beta: float = 1.0  # activity: P(select) grows like (available examples) ** beta
    devices_per_round: int = 10
    weighting: Literal["examples", "equal", "inverse-probability", "unbiased"] = "examples"
    floor: float = 0.0  # activity: every device keeps >= ~floor x its uniform inclusion chance
    beta_end: float = -1.0  # activity: >= 0 anneals beta linearly to this by the last round


@dataclass
class ServerConfig:
    aggregation: Literal[
        "fedavg", "fedadam", "qfedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"
    ] = "fedavg"
    trim_beta: float = 0.2  # fedtrimmedavg: share cut from each end, per coordinate
    malicious: int = 0  # krum, multikrum, bulyan: devices per round assumed malicious
    max_update_norm: float = 0.0  # > 0: each reply's update is scaled down to this L2 norm
    min_replies: int = 1  # a round needs this many usable replies, else it is retried
    retries: int = 1  # fresh selections of a round with too few replies before it is skipped
    round_timeout: float = 3600.0  # seconds to wait for replies (0 = no limit); late = failed
    q: float = 0.2  # qfedavg: fairness exponent of q-FFL (0 = FedAvg-like)
    qffl_lr: float = 0.0  # qfedavg: L = 1 / qffl_lr (0 = client.lr, the paper's SGD devices)
    rounds: int = 12
    server_lr: float = 1e-2  # FedAdam eta
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    eval_examples: int = 500  # per-round central evaluation subset (0 = whole test set)
    eval_batch_size: int = 256
    oos_rejection: Literal["msp", "energy", "none"] = "msp"  # intent: reject below a tuned score


@dataclass
class MitigationConfig:
    """Cohort-fairness mitigations beyond selection (off by default; not with DP)."""

    reweighting: Literal["none", "adversarial"] = "none"  # ARW: up-weight high-loss devices
    arw_step: float = 1.0  # adversary's step on the devices' losses
    arw_bound: float = 5.0  # a device's multiplier stays within [1/bound, bound]
    finetune_rounds: int = 0  # last rounds: worst discovered cohort up-weighted, EWC penalty
    finetune_upweight: float = 4.0  # selection weight multiplier of the worst cohort's devices
    finetune_max_share: float = 0.25  # the cohort holds at most this share of the devices
    ewc_lambda: float = 1.0  # strength of the EWC pull towards each phase round's global model


@dataclass
class CohortConfig:
    """Cohort discovery in every federated run's report (`fedtrust.fairness.discovery`)."""

    quantiles: int = 4  # activity cohorts
    min_devices: int = 10  # smallest discovered cohort (scored devices) worth reporting
    max_share: float = 0.5  # largest discovered cohort (share of devices): a failed minority
    clusters: int = 8  # k-means clusters of held-out sentence embeddings (0 = off)
    embed_examples: int = 2000  # held-out examples embedded for the clusters
    resamples: int = 1000  # bootstrap resamples of every confidence interval


@dataclass
class PrivacyConfig:
    """Differential privacy: on when target_epsilon > 0 or noise_multiplier > 0."""

    level: Literal["sample", "user"] = "sample"  # DP-SGD on each device, or DP-FedAvg on the server
    target_epsilon: float = 0.0
    target_delta: float = 0.0  # 0 = default_delta(N): min(1e-5, 0.01 / N), N examples or devices
    noise_multiplier: float = 0.0  # used as given when target_epsilon = 0
    max_grad_norm: float = 1.0  # C: per-example gradient (sample) or per-device update (user)
    clipping: Literal["flat", "automatic"] = "flat"
    accountant: Literal["pld", "rdp", "prv"] = "pld"
    participations: int = 0  # sample level: participations a device budgets for (0 = auto)
    max_inclusion: float = 0.0  # user level, activity selection: public cap q_max (0 = 2k/N)
    activity_reference: float = 0.0  # user level, activity: public count sampled at rate k/N
    reproducible_noise: bool = False  # seed the noise from run.seed: NO privacy against its holder
    audit_canaries: int = 0  # one-run audit inside the run: m white-box canaries (0 = off)

    @property
    def enabled(self) -> bool:
        return self.target_epsilon > 0 or self.noise_multiplier > 0


@dataclass
class AuditConfig:
    """`fedtrust audit`: models trained at several privacy levels, attacked two ways."""

    epsilons: list[float] = field(default_factory=lambda: [0.0, 8.0, 1.0])  # 0 = no DP
    examples: int = 2000  # audit pool from the training split: a random half are the members
    epochs: int = 10  # training epochs of every target and shadow model
    shadows: int = 4  # LiRA / reference models, each trained on a random half of the pool
    canary_repetitions: list[int] = field(default_factory=lambda: [1, 5, 20])
    canaries_per_level: int = 2
    canary_decoys: int = 100  # per canary prefix: other users saying it with their own secrets
    canary_candidates: int = 10000  # exposure: rank among this many secrets (>= space: exact)
    extraction_steps: int = 150
    search_budget: int = 10000  # extraction: exact scoring of top-k combinations (10^4 = all)
    eval_examples: int = 1000  # test examples for each model's accuracy
    one_run_canaries: int = 1000  # white-box gradient canaries in each DP target (0 = off)
    federated_rounds: int = 0  # > 0: also audit user-level DP-FedAvg runs of this many rounds
    plant_canaries: bool = False  # simulate/train: plant these canaries in the training data
    canary_device: int = 0  # simulate: the device whose data holds the canaries


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "runs"
    name: str = ""  # run folder name (default: derived from the time)
    ray_address: str = ""  # attach to this Ray cluster ("auto", "ip:6379"); "" = start a local one
    tensorboard: bool = False  # also write the per-round metrics as TensorBoard events


@dataclass
class Config(Sections):
    task: TaskSpec = field(default_factory=TaskSpec)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    devices: StorageSettings = field(default_factory=StorageSettings)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    client: ClientSettings = field(default_factory=ClientSettings)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    cohorts: CohortConfig = field(default_factory=CohortConfig)
    faults: FaultSettings = field(default_factory=FaultSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then each `--set` override; validated at the end."""
    cfg = load_sections(Config(), path, overrides, BUNDLED)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (resolved configs, messages)."""
    cfg = apply(Config(), data, "config")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that a type alone cannot express; errors name where the value came from."""
    require = requirement(cfg)
    p, d, s, c, v, t = cfg.partition, cfg.devices, cfg.selection, cfg.client, cfg.server, cfg.task
    require(p.num_devices >= 1, "partition.num_devices", "must be >= 1, got {value}")
    require(p.alpha > 0, "partition.alpha", "must be > 0, got {value}")
    require(p.exponent > 0, "partition.exponent", "must be > 0, got {value}")
    require(p.min_examples >= 1, "partition.min_examples", "must be >= 1, got {value}")
    require(
        0 < d.initial_fraction <= 1, "devices.initial_fraction", "must be in (0, 1], got {value}"
    )
    require(d.arrival_rate >= 0, "devices.arrival_rate", "must be >= 0, got {value}")
    require(d.capacity >= 0, "devices.capacity", "must be >= 0 (0 = unlimited), got {value}")
    require(s.beta >= 0, "selection.beta", "must be >= 0, got {value}")
    require(0 <= s.floor <= 1, "selection.floor", "must be in [0, 1], got {value}")
    require(
        s.beta_end == -1 or s.beta_end >= 0,
        "selection.beta_end",
        "must be >= 0 (or -1 = no annealing), got {value}",
    )
    require(s.devices_per_round >= 1, "selection.devices_per_round", "must be >= 1, got {value}")
    require(
        s.devices_per_round <= p.num_devices or p.scheme == "natural",
        "selection.devices_per_round",
        f"{{value}} is larger than the population (partition.num_devices = {p.num_devices})",
    )
    require(
        not (s.weighting == "unbiased" and v.aggregation != "fedavg"),
        "selection.weighting",
        "'unbiased' needs server.aggregation = 'fedavg' (use 'inverse-probability' with fedadam)",
    )
    require(c.epochs >= 1 or c.steps >= 1, "client.epochs", "must be >= 1 (or client.steps >= 1)")
    require(c.steps >= 0, "client.steps", "must be >= 0, got {value}")
    require(c.batch_size >= 1, "client.batch_size", "must be >= 1, got {value}")
    require(c.lr > 0, "client.lr", "must be > 0, got {value}")
    require(c.head_lr_scale > 0, "client.head_lr_scale", "must be > 0, got {value}")
    require(c.num_cpus >= 1, "client.num_cpus", "must be >= 1, got {value}")
    require(v.rounds >= 1, "server.rounds", "must be >= 1, got {value}")
    require(v.eval_examples >= 0, "server.eval_examples", "must be >= 0, got {value}")
    require(0 < t.test_fraction < 1, "task.test_fraction", "must be in (0, 1), got {value}")
    require(t.max_length >= 2, "task.max_length", "must be >= 2, got {value}")
    require(t.freeze_layers >= 0, "task.freeze_layers", "must be >= 0, got {value}")
    require(v.q >= 0, "server.q", "must be >= 0, got {value}")
    require(v.qffl_lr >= 0, "server.qffl_lr", "must be >= 0 (0 = client.lr), got {value}")
    _validate_fairness(cfg, require)
    _validate_robustness(cfg, require)
    _validate_compression(cfg)
    q = cfg.privacy
    require(q.target_epsilon >= 0, "privacy.target_epsilon", "must be > 0 (0 = off), got {value}")
    require(0 <= q.target_delta < 1, "privacy.target_delta", "must be in [0, 1), got {value}")
    require(q.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0, got {value}")
    require(q.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0, got {value}")
    require(q.participations >= 0, "privacy.participations", "must be >= 0, got {value}")
    require(q.activity_reference >= 0, "privacy.activity_reference", "must be >= 0, got {value}")
    require(q.audit_canaries >= 0, "privacy.audit_canaries", "must be >= 0 (0 = off), got {value}")
    require(0 <= q.max_inclusion <= 1, "privacy.max_inclusion", "must be in [0, 1], got {value}")
    require(
        not (q.enabled and q.level == "sample" and q.accountant != "pld"),
        "privacy.accountant",
        "{value!r} accounts add/remove neighbours only; sample-level DP treats example counts as "
        "public (replace-one neighbours), which needs 'pld'",
    )
    a = cfg.audit
    require(bool(a.epsilons), "audit.epsilons", "needs at least one level (0 = no DP), got {value}")
    require(min(a.epsilons or [0]) >= 0, "audit.epsilons", "must be >= 0 (0 = no DP), got {value}")
    require(a.examples >= 20, "audit.examples", "must be >= 20, got {value}")
    require(a.epochs >= 1, "audit.epochs", "must be >= 1, got {value}")
    require(a.shadows >= 0, "audit.shadows", "must be >= 0 (0 = loss attack only), got {value}")
    require(
        min(a.canary_repetitions or [1]) >= 1,
        "audit.canary_repetitions",
        "every repetition count must be >= 1 (drop a level instead of 0), got {value}",
    )
    require(a.canaries_per_level >= 0, "audit.canaries_per_level", "must be >= 0, got {value}")
    require(a.canary_candidates >= 1, "audit.canary_candidates", "must be >= 1, got {value}")
    require(a.canary_decoys >= 0, "audit.canary_decoys", "must be >= 0, got {value}")
    require(
        a.federated_rounds >= 0, "audit.federated_rounds", "must be >= 0 (0 = off), got {value}"
    )
    require(
        a.one_run_canaries > 0 or a.federated_rounds == 0,
        "audit.one_run_canaries",
        "must be > 0 when audit.federated_rounds > 0 (the federated levels audit with canary "
        "devices), got {value}",
    )
    require(a.one_run_canaries >= 0, "audit.one_run_canaries", "must be >= 0, got {value}")
    require(a.search_budget >= 1, "audit.search_budget", "must be >= 1, got {value}")


def _validate_robustness(cfg: Config, require: Callable[[bool, str, str], None]) -> None:
    v, f, k = cfg.server, cfg.faults, cfg.selection.devices_per_round
    require(0 <= v.trim_beta < 0.5, "server.trim_beta", "must be in [0, 0.5), got {value}")
    require(v.malicious >= 0, "server.malicious", "must be >= 0, got {value}")
    require(
        v.aggregation not in ("krum", "multikrum") or k > 2 * v.malicious + 2,
        "server.malicious",
        f"{{value}}: Krum needs selection.devices_per_round > 2 * malicious + 2 (got {k})",
    )
    require(
        v.aggregation != "bulyan" or k > 4 * v.malicious + 2,
        "server.malicious",
        f"{{value}}: Bulyan needs selection.devices_per_round > 4 * malicious + 2 (got {k})",
    )
    require(v.max_update_norm >= 0, "server.max_update_norm", "must be >= 0 (0 = off), got {value}")
    require(
        1 <= v.min_replies <= k,
        "server.min_replies",
        f"must be in [1, selection.devices_per_round = {k}], got {{value}}",
    )
    require(v.retries >= 0, "server.retries", "must be >= 0, got {value}")
    require(
        v.round_timeout >= 0, "server.round_timeout", "must be >= 0 (0 = no limit), got {value}"
    )
    robust = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
    require(
        not (cfg.privacy.enabled and cfg.privacy.level == "user" and v.aggregation in robust),
        "server.aggregation",
        "{value!r}: user-level DP releases one clipped, noised mean (its clip already bounds "
        "every device); use fedavg or fedadam",
    )
    require(
        v.aggregation not in robust or cfg.mitigation.reweighting == "none",
        "mitigation.reweighting",
        f"{{value!r}} reweights a mean; server.aggregation = {v.aggregation!r} is not one",
    )
    for name in ("crash", "slow", "nan", "malformed", "nan_metric"):
        require(0 <= getattr(f, name) <= 1, f"faults.{name}", "must be in [0, 1], got {value}")
    require(f.slow_seconds >= 0, "faults.slow_seconds", "must be >= 0, got {value}")
    require(f.byzantine >= 0, "faults.byzantine", "must be >= 0, got {value}")
    require(f.attack_scale > 0, "faults.attack_scale", "must be > 0, got {value}")


def _validate_compression(cfg: Config) -> None:
    """The library's own checks (`CompressionSettings.check`), with where the value came from."""
    try:
        cfg.compression.check()
    except ConfigError as err:
        key = str(err).split(":", 1)[0]
        raise ConfigError(
            f"{cfg.__dict__.get('_sources', {}).get(key, 'default')}: {err}"
        ) from None


def _validate_fairness(cfg: Config, require: Callable[[bool, str, str], None]) -> None:
    m, c = cfg.mitigation, cfg.cohorts
    require(m.arw_step > 0, "mitigation.arw_step", "must be > 0, got {value}")
    require(m.arw_bound >= 1, "mitigation.arw_bound", "must be >= 1, got {value}")
    require(
        0 <= m.finetune_rounds < cfg.server.rounds,
        "mitigation.finetune_rounds",
        f"must be in [0, server.rounds = {cfg.server.rounds}), got {{value}}",
    )
    require(
        0 < m.finetune_max_share <= 1,
        "mitigation.finetune_max_share",
        "must be in (0, 1], got {value}",
    )
    require(m.finetune_upweight >= 1, "mitigation.finetune_upweight", "must be >= 1, got {value}")
    require(m.ewc_lambda >= 0, "mitigation.ewc_lambda", "must be >= 0, got {value}")
    require(
        not (m.reweighting == "adversarial" and cfg.server.aggregation == "qfedavg"),
        "mitigation.reweighting",
        "{value!r} cannot be combined with server.aggregation = 'qfedavg' (q-FFL weighs "
        "devices by their losses itself)",
    )
    require(
        not (m.reweighting == "adversarial" and cfg.selection.weighting == "unbiased"),
        "mitigation.reweighting",
        "{value!r} needs normalised weights; selection.weighting = 'unbiased' is not",
    )
    require(
        m.finetune_rounds == 0 or cfg.selection.weighting in ("examples", "equal"),
        "mitigation.finetune_rounds",
        "{value} > 0 up-weights a cohort's selection, which selection.weighting = "
        f"{cfg.selection.weighting!r} divides out again (use 'examples' or 'equal')",
    )
    require(
        cfg.audit.federated_rounds == 0 or not needs_device_losses(cfg),
        "audit.federated_rounds",
        "{value} > 0 audits user-level DP runs, which refuse q-FFL, reweighting and "
        "fine-tuning (their device losses are not covered): turn those off for the audit",
    )
    if cfg.privacy.enabled:
        # Device losses and Fisher diagonals would leave the device outside any DP mechanism.
        why = "is not covered by the DP accountant (device losses would leave the devices); "
        require(
            cfg.server.aggregation != "qfedavg",
            "server.aggregation",
            "{value!r} " + why + "use fedavg or fedadam with privacy on",
        )
        require(m.reweighting == "none", "mitigation.reweighting", "{value!r} " + why)
        require(m.finetune_rounds == 0, "mitigation.finetune_rounds", "{value} > 0 " + why)
    require(c.quantiles >= 2, "cohorts.quantiles", "must be >= 2, got {value}")
    require(c.min_devices >= 2, "cohorts.min_devices", "must be >= 2, got {value}")
    require(0 < c.max_share <= 1, "cohorts.max_share", "must be in (0, 1], got {value}")
    require(c.clusters >= 0, "cohorts.clusters", "must be >= 0 (0 = off), got {value}")
    require(c.embed_examples >= 1, "cohorts.embed_examples", "must be >= 1, got {value}")
    require(c.resamples >= 100, "cohorts.resamples", "must be >= 100, got {value}")


def needs_device_losses(cfg: Config) -> bool:
    """Whether devices must report their loss at the global model (loss-aware mitigations)."""
    m = cfg.mitigation
    return cfg.server.aggregation == "qfedavg" or m.reweighting != "none" or m.finetune_rounds > 0
