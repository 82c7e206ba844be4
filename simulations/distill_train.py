"""Training the distillation run's teacher and students with fedtrust's one training loop.

`tasks.training.train_steps` over random windows of the corpus; AdamW (weight decay 0.01) with
linear warm-up over the first 5 % of the steps and a cosine decay to a tenth of the learning rate
(transformers' `cosine_with_min_lr` schedule); gradients clipped to norm 1 before every step.
A rich bar and five log lines per model show the progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from fedtrust.fairness.distill import (
    distillation_loss,
    teacher_perturbation,
    teacher_targets,
    training_stream,
)
from fedtrust.fairness.wordtokenizer import CounterpartMap
from fedtrust.tasks.training import make_optimizer, train_steps

from .distill_config import DistillConfig
from .distill_data import Corpus, random_windows
from .progress import progress_bar

WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
WARMUP_PART = 20  # warm-up: the first 1/20 of the steps
MIN_LR_RATE = 0.1  # the cosine decays to this share of the learning rate
LOG_LINES = 5

StepLoss = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def train_lm(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    step_loss: StepLoss,
    steps: int,
    lr: float,
    console: Console,
    label: str,
) -> dict[str, Any]:
    """`steps` updates of `model` on `batches`; {"steps", "seconds", "final": last losses}."""
    optimizer = make_optimizer(model, lr, head_prefixes=(), weight_decay=WEIGHT_DECAY)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, max(1, steps // WARMUP_PART), steps, min_lr_rate=MIN_LR_RATE
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def clip(*_: Any) -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)

    optimizer.register_step_pre_hook(clip)
    last: dict[str, float] = {}

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, parts = step_loss(batch)
        last.clear()
        last.update(loss=float(loss.detach()), **parts)
        return loss

    every = max(1, steps // LOG_LINES)
    progress = progress_bar(console, label)
    bar = progress.add_task(label, total=steps)
    done = 0

    def after_step(*_: Any) -> None:
        nonlocal done
        done += 1
        progress.update(bar, advance=1)
        if done % every == 0 or done == steps:
            shown = "  ".join(f"{k} {v:.3f}" for k, v in last.items())
            console.print(f"{label} step {done:>5}/{steps}  {shown}")

    optimizer.register_step_post_hook(after_step)
    start = time.time()
    model.train()
    with progress:
        train_steps(optimizer, batches, loss_of, max_steps=steps, scheduler=scheduler)
    model.eval()
    return {"steps": steps, "seconds": time.time() - start, "final": dict(last)}


def train_teacher(
    model: nn.Module, stream: torch.Tensor, cfg: DistillConfig, console: Console
) -> dict[str, Any]:
    """Plain next-token training of the demo teacher on the original (unswapped) corpus."""
    t = cfg.teacher

    def step_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(input_ids=batch["input_ids"]).logits
        labels = batch["labels"]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)), {}

    batches = random_windows(stream, t.steps, t.batch_size, cfg.data.context, cfg.run.seed)
    return train_lm(model, batches, step_loss, t.steps, t.lr, console, "teacher")


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
    s, k = cfg.student, cfg.distill
    stream = training_stream(corpus.train, corpus.train_swapped, variant, k.cda)
    perturb = teacher_perturbation(variant, counterparts)
    teacher.eval()

    def step_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = batch["input_ids"]
        targets = teacher_targets(
            teacher, inputs, k.temperature, perturb, k.perturb, k.perturb_scope
        )
        logits = student(input_ids=inputs).logits
        return distillation_loss(
            logits, targets, batch["labels"], k.temperature, k.kd_weight, k.lm_weight
        )

    # seed + 1: the same batches for every variant, others than the teacher's
    batches = random_windows(stream, s.steps, s.batch_size, cfg.data.context, cfg.run.seed + 1)
    return train_lm(student, batches, step_loss, s.steps, s.lr, console, f"student {variant}")
