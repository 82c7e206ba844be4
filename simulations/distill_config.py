"""The config of `fedtrust fairness distill`: sections, defaults, loading and range checks.

The bundled demo is `simulations/configs/distill.toml` (`--config distill`); any section key can
be overridden with `--set section.key=value`, as for every fedtrust command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedtrust.fairness.distill import VARIANTS

from .config import BUNDLED
from .config_files import Sections, load_sections, requirement

DEFAULT_CONFIG = BUNDLED / "distill.toml"


@dataclass
class DataSection:
    corpus: str = "shakespeare"  # "shakespeare" (bundled) or a UTF-8 .txt file
    val_fraction: float = 0.1  # the corpus's tail, held out for perplexity
    context: int = 64  # tokens per training sequence
    vocab_size: int = 4000  # own teacher: word-level vocabulary (plus every paired gender word)
    eval_tokens: int = 20000  # held-out tokens scored for perplexity (0 = all)


@dataclass
class TeacherSection:
    model: str = ""  # "" = train a GPT-2 teacher on the corpus; else a local folder or hub id
    layers: int = 4
    width: int = 256
    heads: int = 4
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class StudentSection:
    layers: int = 2
    width: int = 128
    heads: int = 4
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class DistillSection:
    variants: list[str] = field(default_factory=lambda: ["plain", "cda", "cda+perturb"])
    temperature: float = 2.0
    kd_weight: float = 0.5
    lm_weight: float = 0.5
    cda: Literal["two-sided", "one-sided"] = "two-sided"
    perturb: Literal["max", "mean", "geomean", "swap"] = "max"
    perturb_scope: Literal["all", "gendered"] = "all"


@dataclass
class BoldSection:
    prompts: str = ""  # "" = the bundled BOLD gender prompts; else a BOLD-format JSON file
    male_group: str = "American_actors"
    female_group: str = "American_actresses"
    per_group: int = 100  # prompts per group (0 = all)
    samples_per_prompt: int = 3
    max_new_tokens: int = 20
    decoding: Literal["sample", "greedy"] = "sample"
    temperature: float = 1.0
    top_k: int = 0  # 0 = the full distribution


@dataclass
class RunSection:
    seed: int = 0
    output_dir: str = "runs"
    name: str = ""  # run folder (default: distill-<time>); an existing one reuses finished models
    threads: int = 0  # torch CPU threads (0 = torch's default)


@dataclass
class DistillConfig(Sections):
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    bold: BoldSection = field(default_factory=BoldSection)
    run: RunSection = field(default_factory=RunSection)


def load_distill_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> DistillConfig:
    """Defaults, then the TOML file (a path or a bundled name), then each `--set` override."""
    cfg = load_sections(DistillConfig(), path, overrides, BUNDLED)
    validate_distill(cfg)
    return cfg


def validate_distill(cfg: DistillConfig) -> None:
    """Range checks; every error names where the value came from, the key and the value."""
    require = requirement(cfg, show=repr)
    d, t, s, k, b, r = cfg.data, cfg.teacher, cfg.student, cfg.distill, cfg.bold, cfg.run
    require(
        d.corpus == "shakespeare" or Path(d.corpus).is_file(),
        "data.corpus",
        "{value} is neither 'shakespeare' nor an existing text file",
    )
    require(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1), got {value}")
    require(d.context >= 2, "data.context", "must be >= 2, got {value}")
    require(d.vocab_size >= 16, "data.vocab_size", "must be >= 16, got {value}")
    require(d.eval_tokens >= 0, "data.eval_tokens", "must be >= 0 (0 = all), got {value}")
    for name, sec in (("teacher", t), ("student", s)):
        require(sec.layers >= 1, f"{name}.layers", "must be >= 1, got {value}")
        require(sec.heads >= 1, f"{name}.heads", "must be >= 1, got {value}")
        require(
            sec.width >= 1 and sec.width % max(sec.heads, 1) == 0,
            f"{name}.width",
            f"{{value}} must be a positive multiple of {name}.heads = {sec.heads}",
        )
        require(sec.steps >= 0, f"{name}.steps", "must be >= 0, got {value}")
        require(sec.batch_size >= 1, f"{name}.batch_size", "must be >= 1, got {value}")
        require(sec.lr > 0, f"{name}.lr", "must be > 0, got {value}")
    require(s.steps >= 1, "student.steps", "must be >= 1, got {value}")
    require(bool(t.model) or t.steps >= 1, "teacher.steps", "must be >= 1 to train a teacher")
    require(bool(k.variants), "distill.variants", "must name at least one variant, got {value}")
    for v in k.variants:
        require(
            v in VARIANTS,
            "distill.variants",
            f"{v!r} in {{value}} is not one of {', '.join(map(repr, VARIANTS))}",
        )
    require(len(set(k.variants)) == len(k.variants), "distill.variants", "has duplicates: {value}")
    require(k.temperature > 0, "distill.temperature", "must be > 0, got {value}")
    require(k.kd_weight >= 0, "distill.kd_weight", "must be >= 0, got {value}")
    require(k.lm_weight >= 0, "distill.lm_weight", "must be >= 0, got {value}")
    require(
        k.kd_weight + k.lm_weight > 0,
        "distill.kd_weight",
        "and distill.lm_weight cannot both be 0 (kd_weight = {value})",
    )
    require(
        not b.prompts or Path(b.prompts).is_file(),
        "bold.prompts",
        "{value}: prompt file not found",
    )
    require(b.per_group >= 0, "bold.per_group", "must be >= 0 (0 = all), got {value}")
    require(b.samples_per_prompt >= 1, "bold.samples_per_prompt", "must be >= 1, got {value}")
    require(b.max_new_tokens >= 1, "bold.max_new_tokens", "must be >= 1, got {value}")
    require(b.temperature > 0, "bold.temperature", "must be > 0, got {value}")
    require(b.top_k >= 0, "bold.top_k", "must be >= 0 (0 = off), got {value}")
    require(r.threads >= 0, "run.threads", "must be >= 0 (0 = default), got {value}")
