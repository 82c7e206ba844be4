"""`fedtrust fairness distill`: counterfactual role-reversal distillation, teacher vs students.

The method (losses, teacher perturbation, CDA streams, perplexity) is `fedtrust.fairness.distill`;
this module runs the experiment: the config (`distill_config`), the teacher (trained here on the
corpus, reused from the run folder, or loaded), one student per variant (`distill_train`), BOLD
disparity and perplexity of every model, and the report (`distill_report`).

The demo (`simulations/configs/distill.toml`) trains its own teacher on the vendored Shakespeare
(there are no hub models here). On a real GPT-2 (the student then uses GPT-2's BPE and vocabulary):

    fedtrust fairness distill --config distill \\
        --set teacher.model=gpt2 --set data.context=128 --set run.threads=0 \\
        --set student.layers=6 --set student.width=768 --set student.heads=12

(DistilGPT-2's shape) with the hub reachable (HF_HUB_OFFLINE unset), or `teacher.model` = any local
folder saved with `save_pretrained`. Give `data.corpus` your own text file for a realistic run:
Shakespeare is small, and on a CPU a GPT-2-sized student needs far more than the demo's steps.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase

from fedtrust.errors import ConfigError, RunFolderError
from fedtrust.fairness.bold import evaluate_bold, load_bold_prompts, sample_prompts
from fedtrust.fairness.distill import perplexity
from fedtrust.fairness.wordpairs import WordPairs, load_word_pairs
from fedtrust.fairness.wordtokenizer import build_word_tokenizer, counterpart_map
from fedtrust.tasks.lm import gpt2_model

from .distill_config import (
    DEFAULT_CONFIG,
    DistillConfig,
    StudentSection,
    TeacherSection,
    load_distill_config,
)
from .distill_data import Corpus, encode, read_corpus, split_text, token_streams
from .distill_models import digest, finished, load_given_teacher, n_params, save_stage
from .distill_report import write_report
from .distill_train import distill_student, train_teacher


def run_distill(
    config_path: Path | str | None, overrides: list[str], console: Console | None = None
) -> tuple[Path, dict[str, Any]]:
    """Teacher, then one student per variant; evaluate all; write the report into a run folder.

    `config_path` None = the bundled demo (`simulations/configs/distill.toml`). Returns the run
    folder and the report (also written as distill.json, distill.md and distill.png).
    """
    started = time.time()
    cfg = load_distill_config(config_path or DEFAULT_CONFIG, overrides)
    console = console or Console()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    name = cfg.run.name or datetime.now().strftime("distill-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"{run_dir}: cannot create the run folder ({err})") from None
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    pairs = load_word_pairs()
    prompts = sample_prompts(
        load_bold_prompts(cfg.bold.prompts or None),
        (cfg.bold.male_group, cfg.bold.female_group),
        cfg.bold.per_group,
        cfg.run.seed,
    )

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
        stage = digest(cfg.data, cfg.teacher, cfg.student, cfg.distill, cfg.run.seed, variant)
        if (info := finished(folder, stage)) is not None:
            console.print(f"reusing the {variant} student in [bold]{folder}[/]")
            student = GPT2LMHeadModel.from_pretrained(folder)
        else:
            student = _gpt2(tokenizer, vocab, cfg.data.context, s, cfg.run.seed)
            info = {
                "train": distill_student(
                    student, teacher, corpus, counterparts, variant, cfg, console
                )
            }
            save_stage(folder, student, tokenizer, stage, info)
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


def _prepare(
    cfg: DistillConfig, run_dir: Path, pairs: WordPairs, console: Console
) -> tuple[nn.Module, PreTrainedTokenizerBase, Corpus, dict[str, Any]]:
    """The teacher (trained here, reused from the run folder, or loaded) and the token streams."""
    d, t = cfg.data, cfg.teacher
    train_text, val_text = split_text(read_corpus(d.corpus), d.val_fraction)
    folder = run_dir / "teacher"
    stage = digest(cfg.data, cfg.teacher, cfg.run.seed)
    info: dict[str, Any] | None
    if t.model:
        console.print(f"loading teacher [bold]{t.model}[/]")
        teacher, tokenizer = load_given_teacher(t.model)
        info = {"source": t.model}
    elif (info := finished(folder, stage)) is not None:
        console.print(f"reusing the teacher in [bold]{folder}[/]")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        teacher = GPT2LMHeadModel.from_pretrained(folder)
    else:
        tokenizer = build_word_tokenizer(train_text, d.vocab_size, pairs)
        teacher = _gpt2(tokenizer, len(tokenizer), d.context, t, cfg.run.seed)
        stream = encode(tokenizer, train_text)
        console.print(
            f"training a {t.layers}x{t.width} GPT-2 teacher on {d.corpus} "
            f"({len(stream):,} tokens, vocabulary {len(tokenizer):,})"
        )
        info = {"source": "trained here", "train": train_teacher(teacher, stream, cfg, console)}
        save_stage(folder, teacher, tokenizer, stage, info)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if d.context > getattr(teacher.config, "n_positions", d.context):
        raise ConfigError(
            f"data.context: {d.context} is longer than the teacher's context "
            f"({teacher.config.n_positions} positions)"
        )
    cda = any("cda" in v for v in cfg.distill.variants)
    corpus = token_streams(
        tokenizer, train_text, val_text, pairs if cda else None, d.corpus, d.context
    )
    info["params"] = n_params(teacher)
    return teacher, tokenizer, corpus, info


def _gpt2(
    tokenizer: PreTrainedTokenizerBase,
    vocab: int,
    context: int,
    shape: TeacherSection | StudentSection,
    seed: int,
) -> nn.Module:
    """A fresh GPT-2 of the section's shape (the tokenizer's padding id: None for GPT-2's own)."""
    pad = tokenizer.pad_token_id
    return gpt2_model(vocab, context, shape.layers, shape.width, shape.heads, pad, seed)


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
    """Held-out perplexity and BOLD disparity of one model, with a one-line summary."""
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
