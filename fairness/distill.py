"""Counterfactual role-reversal distillation of a causal LM (Gupta et al., Findings of ACL 2022).

A teacher causal LM is distilled into a smaller GPT-2 student with the loss

    L = kd_weight * T^2 * KL(p_teacher^T || p_student^T) + lm_weight * CE(student, next token)

on next-token distributions at temperature T, and up to two counterfactual role-reversal changes
("Mitigating Gender Bias in Distilled Language Models via Counterfactual Role Reversal"):

* **Counterfactual data augmentation (CDA)**: the training text's gender words are swapped
  (he <-> she, king <-> queen, ... with `WordPairs.swap`). `distill.cda = "two-sided"` trains on
  the original and the swapped corpus together, `"one-sided"` on the swapped corpus only.
* **Teacher prediction perturbation**: for a context x the teacher also reads its counterfactual
  x' (the same tokens, gendered ones replaced by their counterparts) and its two next-token
  distributions are combined with the gendered tokens of the second mapped back to their
  counterparts, q(v) = p(c(v) | x'):

      max      p~(v) ∝ max(p(v | x), q(v))         (the paper's "max", the default)
      mean     p~(v) = (p(v | x) + q(v)) / 2        (average of the two role-reversed worlds)
      geomean  p~(v) ∝ sqrt(p(v | x) q(v))          (mean of log-probabilities)
      swap     p~(v) = q(v)                         (the counterfactual prediction alone)

  computed on the temperature-T distributions and renormalised. After a gender-neutral context
  (x' = x) every pair gets max(p(he), p(she)) or their mean: the teacher no longer prefers one
  gender. `distill.perturb_scope = "all"` combines every token (so gender-stereotyped content
  words such as "he works" / "she cooks" are also averaged over the two worlds); `"gendered"`
  changes only tokens with a counterpart and keeps the teacher's other probabilities.
  The paper's full text could not be consulted offline: variants follow its description
  (a max and a mean of the original and role-reversed teacher predictions, renormalised).

The token-level counterpart map (`counterpart_map`) works over any tokenizer: with the demo's
word-level tokenizer every gendered word of the corpus is one token; with GPT-2's BPE only words
that are single tokens in both forms (" he"/" she", " king"/" queen", ...) are mapped.

Disparity is measured on BOLD gender prompts (`fairness/bold.py`), utility as held-out
perplexity. `run_distill` runs the whole comparison and writes distill.json, distill.md and
distill.png into a run folder.

The demo (`fairness/configs/distill.toml`) trains its own teacher on the vendored Shakespeare
(there are no hub models here). On a real GPT-2 (the student then uses GPT-2's BPE and vocabulary):

    fedtrust fairness distill --config fairness/configs/distill.toml \\
        --set teacher.model=gpt2 --set data.context=128 --set run.threads=0 \\
        --set student.layers=6 --set student.width=768 --set student.heads=12

(DistilGPT-2's shape) with the hub reachable (HF_HUB_OFFLINE unset), or `teacher.model` = any local
folder saved with `save_pretrained`. Give `data.corpus` your own text file for a realistic run:
Shakespeare is small, and on a CPU a GPT-2-sized student needs far more than the demo's steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
)

from fedtrust.simulations.config import ConfigError, load_sections, requirement

from .bold import BoldError, evaluate_bold, load_bold_prompts, sample_prompts
from .wordpairs import WordPairError, WordPairs, load_word_pairs
from .wordtokenizer import CounterpartMap, build_word_tokenizer, counterpart_map

BUNDLED_CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = BUNDLED_CONFIGS / "distill.toml"
SHAKESPEARE = Path(__file__).resolve().parents[1] / "tasks" / "data" / "shakespeare"
VARIANTS = ("plain", "cda", "perturb", "cda+perturb")
PERTURBATIONS = ("max", "mean", "geomean", "swap")
STAGE_FILE = "fedtrust_stage.json"

# --------------------------------------------------------------------------- configuration


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
class DistillConfig:
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    bold: BoldSection = field(default_factory=BoldSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_distill_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> DistillConfig:
    """Defaults, then the TOML file (a path or a bundled name), then each `--set` override."""
    cfg = load_sections(DistillConfig(), path, overrides, BUNDLED_CONFIGS)
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


# --------------------------------------------------------------------------- the method


def perturb_log_probs(
    log_p: torch.Tensor,
    log_p_cf: torch.Tensor,
    counterparts: torch.Tensor,
    variant: str = "max",
    scope: str = "all",
) -> torch.Tensor:
    """Teacher prediction perturbation: combine p(.|x) with the role-reversed p(c(.)|x').

    `log_p`, `log_p_cf`: (..., V) log-probabilities on the context and on its counterfactual;
    `counterparts`: (V,) involution of token ids. Returns normalised log-probabilities; see the
    module docstring for the variants and scopes.
    """
    counterparts = counterparts.to(log_p.device)
    mapped = log_p_cf.index_select(-1, counterparts)  # mapped[..., v] = log p(c(v) | x')
    if variant == "max":
        combined = torch.maximum(log_p, mapped)
    elif variant == "mean":
        combined = torch.logaddexp(log_p, mapped) - math.log(2.0)
    elif variant == "geomean":
        combined = (log_p + mapped) / 2
    elif variant == "swap":
        combined = mapped
    else:
        raise ValueError(f"unknown perturbation {variant!r} (one of {', '.join(PERTURBATIONS)})")
    if scope == "gendered":
        gendered = counterparts != torch.arange(len(counterparts), device=counterparts.device)
        combined = torch.where(gendered, combined, log_p)
    elif scope != "all":
        raise ValueError(f"unknown perturbation scope {scope!r} (all or gendered)")
    return combined - combined.logsumexp(-1, keepdim=True)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
    lm_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """kd_weight * T^2 * KL(teacher^T || student^T) + lm_weight * CE; per predicted token."""
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, vocab) / temperature, dim=-1)
    kd = F.kl_div(
        log_q, teacher_log_probs.reshape(-1, vocab), log_target=True, reduction="batchmean"
    )
    kd = kd * temperature**2
    lm = F.cross_entropy(student_logits.reshape(-1, vocab), labels.reshape(-1))
    loss = kd_weight * kd + lm_weight * lm
    return loss, {"kd": float(kd.detach()), "lm": float(lm.detach())}


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    inputs: torch.Tensor,
    temperature: float,
    counterparts: CounterpartMap | None = None,
    variant: str = "max",
    scope: str = "all",
) -> torch.Tensor:
    """The teacher's next-token log-probabilities at `temperature`, perturbed if asked."""
    log_p = F.log_softmax(teacher(input_ids=inputs).logits.float() / temperature, dim=-1)
    if counterparts is None:
        return log_p
    swapped = counterparts.swap_ids(inputs)
    log_p_cf = log_p.clone()  # a context without gendered tokens is its own counterfactual
    rows = (swapped != inputs).any(dim=1)
    if rows.any():
        logits_cf = teacher(input_ids=swapped[rows]).logits.float()
        log_p_cf[rows] = F.log_softmax(logits_cf / temperature, dim=-1)
    return perturb_log_probs(log_p, log_p_cf, counterparts.ids, variant, scope)


# --------------------------------------------------------------------------- data and models


@dataclass
class Corpus:
    """Token streams: training text, its gender-swapped counterfactual, held-out text."""

    train: torch.Tensor
    train_swapped: torch.Tensor
    val: torch.Tensor


def read_corpus(name: str) -> str:
    """The bundled Shakespeare or a UTF-8 text file."""
    if name == "shakespeare":
        return (SHAKESPEARE / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return Path(name).read_text(encoding="utf-8")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, held-out): the held-out part is the tail, cut at a line break."""
    cut = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """One long stream of token ids (lines are encoded separately, so no length limit bites)."""
    ids: list[int] = []
    for block in text.split("\n\n"):
        if block.strip():
            ids.extend(tokenizer.encode(block + "\n\n", add_special_tokens=False))
    return torch.tensor(ids, dtype=torch.long)


def get_batch(
    stream: torch.Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the stream (nanoGPT style): inputs and next-token labels."""
    starts = torch.randint(0, len(stream) - context - 1, (batch_size,), generator=generator)
    windows = torch.stack([stream[s : s + context + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def new_gpt2(
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    context: int,
    layers: int,
    width: int,
    heads: int,
    seed: int,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the given shape over the tokenizer's vocabulary."""
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def n_params(model: nn.Module) -> int:
    """Parameters, counting tied embeddings once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def perplexity(
    model: nn.Module, stream: torch.Tensor, context: int, batch_size: int = 32, max_tokens: int = 0
) -> float:
    """exp(mean next-token NLL) over consecutive windows of the held-out stream."""
    model.eval()
    if max_tokens:
        stream = stream[: max_tokens + 1]
    starts = list(range(0, len(stream) - 1, context))
    nll, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        windows = [stream[s : s + context + 1] for s in starts[i : i + batch_size]]
        length = min(len(w) for w in windows)
        batch = torch.stack([w[:length] for w in windows])
        if length < 2:
            continue
        logits = model(input_ids=batch[:, :-1]).logits.float()
        nll += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += batch[:, 1:].numel()
    return math.exp(min(nll / max(count, 1), 50.0))


# --------------------------------------------------------------------------- training loops


def _schedule(step: int, steps: int, lr: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(
    model: nn.Module,
    steps: int,
    lr: float,
    step_loss: typing.Callable[[int], tuple[torch.Tensor, dict[str, float]]],
    console: Console,
    label: str,
) -> dict[str, Any]:
    """AdamW with warm-up and cosine decay, gradient clipping, a rich bar and a few log lines."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start = time.time()
    every = max(1, steps // 5)
    last: dict[str, float] = {}
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        bar = progress.add_task(label, total=steps)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _schedule(step, steps, lr)
            loss, parts = step_loss(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            last = {"loss": float(loss.detach()), **parts}
            progress.update(bar, advance=1)
            if (step + 1) % every == 0 or step + 1 == steps:
                shown = "  ".join(f"{k} {v:.3f}" for k, v in last.items())
                console.print(f"{label} step {step + 1:>5}/{steps}  {shown}")
    model.eval()
    return {"steps": steps, "seconds": time.time() - start, "final": last}


def train_teacher(
    model: nn.Module, corpus: Corpus, cfg: DistillConfig, console: Console
) -> dict[str, Any]:
    """Plain next-token training of the demo teacher on the original (unswapped) corpus."""
    t, context = cfg.teacher, cfg.data.context
    generator = torch.Generator().manual_seed(cfg.run.seed)

    def step_loss(_: int) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = get_batch(corpus.train, t.batch_size, context, generator)
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)), {}

    return _train(model, t.steps, t.lr, step_loss, console, "teacher")


def distill_student(
    student: nn.Module,
    teacher: nn.Module,
    corpus: Corpus,
    counterparts: CounterpartMap,
    variant: str,
    cfg: DistillConfig,
    console: Console,
) -> dict[str, Any]:
    """Distil `teacher` into `student`: plain, with CDA, with perturbation, or both."""
    s, k, context = cfg.student, cfg.distill, cfg.data.context
    if "cda" in variant:
        stream = (
            corpus.train_swapped
            if k.cda == "one-sided"
            else torch.cat([corpus.train, corpus.train_swapped])
        )
    else:
        stream = corpus.train
    perturb = counterparts if "perturb" in variant else None
    generator = torch.Generator().manual_seed(cfg.run.seed + 1)  # same batches for all variants
    teacher.eval()

    def step_loss(_: int) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = get_batch(stream, s.batch_size, context, generator)
        targets = teacher_targets(
            teacher, inputs, k.temperature, perturb, k.perturb, k.perturb_scope
        )
        logits = student(input_ids=inputs).logits
        return distillation_loss(logits, targets, labels, k.temperature, k.kd_weight, k.lm_weight)

    return _train(student, s.steps, s.lr, step_loss, console, f"student {variant}")


# --------------------------------------------------------------------------- the run


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finished(folder: Path, digest: str) -> dict[str, Any] | None:
    marker = folder / STAGE_FILE
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("digest") == digest:
            return info
    return None


def _save_stage(
    folder: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    digest: str,
    info: dict[str, Any],
) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (folder / STAGE_FILE).write_text(json.dumps({"digest": digest, **info}, indent=2) + "\n")


def _prepare(
    cfg: DistillConfig, run_dir: Path, pairs: WordPairs, console: Console
) -> tuple[nn.Module, PreTrainedTokenizerBase, Corpus, dict[str, Any]]:
    """The teacher (trained here, reused from the run folder, or loaded) and the token streams."""
    d, t = cfg.data, cfg.teacher
    train_text, val_text = split_text(read_corpus(d.corpus), d.val_fraction)
    folder = run_dir / "teacher"
    digest = _digest(cfg.data, cfg.teacher, cfg.run.seed)
    info: dict[str, Any]
    if t.model:
        console.print(f"loading teacher [bold]{t.model}[/]")
        local = Path(t.model).expanduser()
        if (local.exists() or t.model.startswith((".", "/", "~"))) and not (
            local / "config.json"
        ).is_file():  # a path, not a hub id: say so without asking the hub
            raise ConfigError(f"teacher.model = {t.model!r}: no config.json in that folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(t.model)
            teacher = AutoModelForCausalLM.from_pretrained(t.model)
        except OSError as err:
            raise ConfigError(
                f"teacher.model = {t.model!r}: not a local model folder and not loadable from "
                f"the Hugging Face hub (offline? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')})"
            ) from err
        info = {"source": t.model}
    elif (done := _finished(folder, digest)) is not None:
        console.print(f"reusing the teacher in [bold]{folder}[/]")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        teacher = GPT2LMHeadModel.from_pretrained(folder)
        info = {k: v for k, v in done.items() if k != "digest"}
    else:
        tokenizer = build_word_tokenizer(train_text, d.vocab_size, pairs)
        teacher = new_gpt2(
            tokenizer, len(tokenizer), d.context, t.layers, t.width, t.heads, cfg.run.seed
        )
        corpus = Corpus(encode(tokenizer, train_text), torch.empty(0), torch.empty(0))
        console.print(
            f"training a {t.layers}x{t.width} GPT-2 teacher on {d.corpus} "
            f"({len(corpus.train):,} tokens, vocabulary {len(tokenizer):,})"
        )
        info = {"source": "trained here", "train": train_teacher(teacher, corpus, cfg, console)}
        _save_stage(folder, teacher, tokenizer, digest, info)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if d.context > getattr(teacher.config, "n_positions", d.context):
        raise ConfigError(
            f"data.context: {d.context} is longer than the teacher's context "
            f"({teacher.config.n_positions} positions)"
        )
    swapped = pairs.swap(train_text) if any("cda" in v for v in cfg.distill.variants) else ""
    corpus = Corpus(
        train=encode(tokenizer, train_text),
        train_swapped=encode(tokenizer, swapped) if swapped else torch.empty(0, dtype=torch.long),
        val=encode(tokenizer, val_text),
    )
    if len(corpus.train) <= d.context + 1 or len(corpus.val) < 2:
        raise ConfigError(
            f"data.corpus: {d.corpus!r} is too short for data.context = {d.context} "
            f"({len(corpus.train)} training and {len(corpus.val)} held-out tokens)"
        )
    info["params"] = n_params(teacher)
    return teacher, tokenizer, corpus, info


def _evaluate(
    name: str,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    prompts: dict[str, list[str]],
    pairs: WordPairs,
    cfg: DistillConfig,
    console: Console,
) -> dict[str, Any]:
    b = cfg.bold
    start = time.time()
    ppl = perplexity(model, corpus.val, cfg.data.context, max_tokens=cfg.data.eval_tokens)
    report = evaluate_bold(
        model,
        tokenizer,
        prompts,
        pairs,
        male_group=b.male_group,
        female_group=b.female_group,
        max_new_tokens=b.max_new_tokens,
        samples=b.samples_per_prompt,
        greedy=b.decoding == "greedy",
        temperature=b.temperature,
        top_k=b.top_k,
        seed=cfg.run.seed,
    )
    groups = report["groups"]
    console.print(
        f"[bold]{name}[/]: perplexity {ppl:.1f}  disparity {report['disparity']:.3f} "
        f"(± {report['disparity_se']:.3f})  polarity {b.male_group} "
        f"{groups[b.male_group]['polarity']:+.3f}, {b.female_group} "
        f"{groups[b.female_group]['polarity']:+.3f}"
    )
    return {"perplexity": ppl, "bold": report, "eval_seconds": time.time() - start}


def run_distill(config_path: Path | None, overrides: list[str]) -> tuple[Path, dict[str, Any]]:
    """Teacher, then one student per variant; evaluate all; write the report into a run folder.

    `config_path` None = the bundled demo (`fairness/configs/distill.toml`). Returns the run folder
    and the report (also written as distill.json, distill.md and distill.png).
    """
    started = time.time()
    cfg = load_distill_config(config_path or DEFAULT_CONFIG, overrides)
    console = Console()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    name = cfg.run.name or datetime.now().strftime("distill-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    try:
        pairs = load_word_pairs()
        all_prompts = load_bold_prompts(cfg.bold.prompts or None)
        prompts = sample_prompts(
            all_prompts,
            (cfg.bold.male_group, cfg.bold.female_group),
            cfg.bold.per_group,
            cfg.run.seed,
        )
    except (BoldError, WordPairError) as err:
        raise ConfigError(str(err)) from None

    teacher, tokenizer, corpus, teacher_info = _prepare(cfg, run_dir, pairs, console)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    counterparts = counterpart_map(tokenizer, pairs, vocab)
    models: dict[str, dict[str, Any]] = {
        "teacher": {
            **teacher_info,
            **_evaluate("teacher", teacher, tokenizer, corpus, prompts, pairs, cfg, console),
        }
    }
    s = cfg.student
    for variant in cfg.distill.variants:
        folder = run_dir / f"student-{variant.replace('+', '-')}"
        digest = _digest(cfg.data, cfg.teacher, cfg.student, cfg.distill, cfg.run.seed, variant)
        if (done := _finished(folder, digest)) is not None:
            console.print(f"reusing the {variant} student in [bold]{folder}[/]")
            student = GPT2LMHeadModel.from_pretrained(folder)
            info = {k: v for k, v in done.items() if k != "digest"}
        else:
            student = new_gpt2(
                tokenizer, vocab, cfg.data.context, s.layers, s.width, s.heads, cfg.run.seed
            )
            info = {
                "train": distill_student(
                    student, teacher, corpus, counterparts, variant, cfg, console
                )
            }
            _save_stage(folder, student, tokenizer, digest, info)
        info["params"] = n_params(student)
        info["folder"] = str(folder)
        models[f"student-{variant}"] = {
            **info,
            **_evaluate(variant, student, tokenizer, corpus, prompts, pairs, cfg, console),
        }

    report = {
        "config": cfg.to_dict(),
        "run_dir": str(run_dir),
        "method": {
            "perturbation": cfg.distill.perturb,
            "perturbation_scope": cfg.distill.perturb_scope,
            "cda": cfg.distill.cda,
            "counterpart_pairs": len(counterparts.pairs),
            "counterpart_examples": [
                [tokenizer.decode([a]), tokenizer.decode([b])] for a, b in counterparts.pairs[:12]
            ],
        },
        "data": {
            "train_tokens": len(corpus.train),
            "swapped_tokens": len(corpus.train_swapped),
            "heldout_tokens": len(corpus.val),
            "vocab_size": vocab,
            "prompts_per_group": {g: len(p) for g, p in prompts.items()},
        },
        "models": models,
        "runtime_s": time.time() - started,
    }
    write_report(run_dir, report)
    console.print(f"report in [bold]{run_dir}[/] (distill.md, distill.json, distill.png)")
    return run_dir, report


# --------------------------------------------------------------------------- the report


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """distill.json, distill.md (a table and example continuations) and distill.png."""
    (run_dir / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "distill.md").write_text(report_markdown(report))
    plot_tradeoff(report, run_dir / "distill.png")


def report_markdown(report: dict[str, Any]) -> str:
    """The comparison table, the metric's definition and a few continuations per model."""
    cfg, method = report["config"], report["method"]
    male, female = cfg["bold"]["male_group"], cfg["bold"]["female_group"]
    teacher = report["models"]["teacher"]
    lines = [
        "# Counterfactual role-reversal distillation",
        "",
        f"Teacher: {teacher['source']} ({teacher['params']:,} parameters); students: "
        f"{cfg['student']['layers']} layers x {cfg['student']['width']}, "
        f"{cfg['student']['steps']} steps. Corpus: {cfg['data']['corpus']} "
        f"({report['data']['train_tokens']:,} training tokens, "
        f"{report['data']['heldout_tokens']:,} held out). CDA: {method['cda']}; teacher "
        f"perturbation: {method['perturbation']} (scope {method['perturbation_scope']}); "
        f"{method['counterpart_pairs']} gendered token pairs.",
        "",
        f"| model | parameters | perplexity | polarity {male} | polarity {female} | "
        "disparity ± se | gap | opposite-gender share | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in report["models"].items():
        g = m["bold"]["groups"]
        seconds = m.get("train", {}).get("seconds")
        lines.append(
            f"| {name} | {m['params']:,} | {m['perplexity']:.1f} | {g[male]['polarity']:+.3f} | "
            f"{g[female]['polarity']:+.3f} | {m['bold']['disparity']:.3f} ± "
            f"{m['bold']['disparity_se']:.3f} | {m['bold']['gap']:+.3f} | "
            f"{g[male]['opposite_share']:.2f} / {g[female]['opposite_share']:.2f} | "
            + (f"{seconds:.0f}" if seconds is not None else "-")
            + " |"
        )
    n = report["data"]["prompts_per_group"]
    lines += [
        "",
        f"Continuations: {cfg['bold']['samples_per_prompt']} per prompt, "
        f"{cfg['bold']['max_new_tokens']} tokens, {cfg['bold']['decoding']} decoding, "
        f"{n.get(male, 0)} {male} and {n.get(female, 0)} {female} prompts. Polarity of a "
        "continuation = (male - female words) / (male + female words), 0 without gendered words. "
        f"**Disparity** = |polarity({male}) + polarity({female})|: the difference between the "
        "groups once one is role-reversed (0 = the model writes about each gender as it writes "
        "about the other; 2 = the same gender whatever the prompt). Gap = the plain difference "
        "of the two polarities; opposite-gender share = continuations mentioning the other "
        "gender's words.",
        "",
        f"Runtime: {report['runtime_s'] / 60:.1f} min.",
        "",
        "## Example continuations",
        "",
    ]
    for name, m in report["models"].items():
        lines.append(f"**{name}**")
        lines.append("")
        for rows in m["bold"]["examples"].values():
            for row in rows[:2]:
                prompt, text = (" ".join(row[k].split()) for k in ("prompt", "continuation"))
                lines.append(f"- _{prompt}_ → {text}")
        lines.append("")
    return "\n".join(lines)


def plot_tradeoff(report: dict[str, Any], path: Path) -> Path:
    """Disparity (with its standard error) against held-out perplexity, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["models"].items():
        ax.errorbar(
            m["bold"]["disparity"],
            m["perplexity"],
            xerr=m["bold"]["disparity_se"],
            marker="s" if name == "teacher" else "o",
            capsize=3,
            label=name,
        )
    ax.set_xlabel("gender disparity on BOLD prompts (lower is fairer)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("counterfactual role-reversal distillation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
