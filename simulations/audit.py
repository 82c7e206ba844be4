"""The privacy audit: how much do models trained at several privacy levels actually leak?

`run_audit` draws an audit pool from the training split; a random half are the *members*. For
every level of `audit.epsilons` (0 = no DP) a target model is trained on the members plus the
planted canaries (eDP-SGD for ε > 0); `audit.shadows` shadow models, each trained without DP on
a random half of the pool, calibrate the attacks. Each target is then attacked:

- membership inference on members vs the other half of the pool: loss threshold, reference
  (difficulty-calibrated by the shadows that did not see the example), LiRA online and offline;
- canary extraction: model inversion of every canary's secret and its exposure.

Every trained model and its scores are saved under `models/`; a re-run with the same output
folder reuses them, so a stopped audit loses at most the model it was training. `attack_run`
runs one attack on a finished `fedtrust simulate` / `train` run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedtrust.clients.train import LocalDP, sample_rate, train_local
from fedtrust.errors import ConfigError, ModelError, RunFolderError
from fedtrust.privacy.accounting import resolve_delta
from fedtrust.privacy.attacks.canary import Canary, canary_report, summarise
from fedtrust.privacy.attacks.membership import check_disjoint, membership_inference
from fedtrust.privacy.attacks.one_run import GradientCanaries, audit_from_losses, split_canaries
from fedtrust.privacy.attacks.scores import example_scores
from fedtrust.tasks import Task, build_task
from fedtrust.tasks.models import quiet_transformers

from .audit_report import plot_roc, write_audit_report
from .canaries import audit_canaries
from .config import AuditConfig, Config
from .population import cached_population
from .run_folder import load_run_model, read_metrics, run_mode, write_config
from .runner import simulate

Progress = Callable[[str], None]
ATTACKS = ("mia", "canary")


def run_audit(cfg: Config, progress: Progress | None = None) -> tuple[Path, dict[str, Any]]:
    """Train, attack and report; returns the output folder and the report dict."""
    say = progress or (lambda message: None)
    began = time.perf_counter()
    torch.set_num_threads(max(1, cfg.client.num_cpus))
    quiet_transformers()
    audit = cfg.audit
    if cfg.task.kind != "intent":
        raise ConfigError(
            f"audit: canary extraction needs a text classifier (task.kind = 'intent'), "
            f"got task.kind = {cfg.task.kind!r}"
        )
    name = cfg.run.name or datetime.now().strftime("audit-%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run.output_dir) / name
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    write_config(out_dir, cfg)

    task = build_task(cfg.task, seed=cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    pool = _pool(task.train, audit.examples, rng)
    # each pool example a member independently with probability 1/2: the pool doubles as the
    # one-run audit's input-space canaries
    is_member = split_canaries(len(pool), rng)
    check_disjoint(
        [pool[i] for i in np.flatnonzero(is_member)], [r for r, m in zip(pool, is_member) if not m]
    )
    tokenizer = AutoTokenizer.from_pretrained(task.model_name)
    canaries, planted = audit_canaries(cfg, task)
    eval_rows = _pool(task.test, audit.eval_examples, np.random.default_rng(cfg.run.seed + 1))

    shadow_in = np.zeros((audit.shadows, len(pool)), dtype=bool)
    shadows = []
    for s in range(audit.shadows):
        shadow_in[
            s, np.random.default_rng([cfg.run.seed, 7, s]).permutation(len(pool))[: len(pool) // 2]
        ] = True
        rows = [pool[i] for i in np.flatnonzero(shadow_in[s])]
        say(f"shadow model {s + 1}/{audit.shadows} ({len(rows)} examples, no DP)")
        scored = _trained(
            cfg, task, rows, 0.0, out_dir / "models" / f"shadow-{s}", pool, eval_rows, 100 + s, say
        )
        shadows.append(scored["scores"])

    levels = []
    for epsilon in audit.epsilons:
        label = "no DP" if epsilon == 0 else f"ε = {epsilon:g}"
        say(f"target model, {label}")
        members = [pool[i] for i in np.flatnonzero(is_member)] + planted
        folder = out_dir / "models" / ("target-nodp" if epsilon == 0 else f"target-eps{epsilon:g}")
        trained = _trained(cfg, task, members, epsilon, folder, pool, eval_rows, 0, say)
        say(f"attacking the {label} model")
        mia = membership_inference(trained["scores"], is_member, shadows, shadow_in)
        one_run = _one_run(trained["info"], trained["scores"], is_member, len(members))
        canary = _canary_attack(
            trained["model"], tokenizer, canaries, task.labels, audit, cfg.run.seed
        )
        levels.append(
            {
                "epsilon": epsilon or None,
                "label": label,
                "achieved_epsilon": trained["info"].get("epsilon"),
                "delta": trained["info"].get("delta"),
                "relation": trained["info"].get("relation"),
                "accountant": trained["info"].get("accountant"),
                "noise_multiplier": trained["info"].get("noise_multiplier"),
                "test": trained["info"]["test"],
                "train_seconds": trained["info"]["seconds"],
                "mia": mia,
                "one_run": one_run,
                "canaries": canary,
                "canary_summary": {str(k): v for k, v in summarise(canary).items()}
                if canary
                else {},
            }
        )
    federated = (
        [_federated_level(cfg, epsilon, out_dir, say) for epsilon in audit.epsilons if epsilon > 0]
        if audit.federated_rounds
        else []
    )
    report = {
        "dataset": cfg.task.dataset,
        "model": cfg.task.model,
        "primary_metric": task.primary_metric,
        "pool": len(pool),
        "members": int(is_member.sum()),
        "non_members": int((~is_member).sum()),
        "shadows": audit.shadows,
        "epochs": audit.epochs,
        "canaries": [asdict(c) for c in canaries],
        "levels": levels,
        "federated": federated,
        "seconds": time.perf_counter() - began,
    }
    write_audit_report(report, out_dir)
    return out_dir, report


def _pool(rows: list[dict], size: int, rng: np.random.Generator) -> list[dict]:
    """`size` distinct rows (by text), in random order."""
    seen, out = set(), []
    for i in rng.permutation(len(rows)):
        key = tuple(rows[i]["input_ids"])
        if key not in seen:
            seen.add(key)
            out.append(rows[i])
            if len(out) == size:
                break
    return out


def _trained(
    cfg: Config,
    task: Task,
    rows: list[dict[str, Any]],
    epsilon: float,
    folder: Path,
    pool: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    seed: int,
    say: Progress,
) -> dict[str, Any]:
    """Train one model (or reload it from `folder`), with its scores on the pool."""
    info_file = folder / "info.json"
    if info_file.is_file():
        say(f"  reusing {folder}")
        model = AutoModelForSequenceClassification.from_pretrained(folder)  # an intent task
        info = json.loads(info_file.read_text())
        scores = dict(np.load(folder / "scores.npz"))
        return {"model": model, "info": info, "scores": scores}
    t0 = time.perf_counter()
    model = task.build_model(cfg.run.seed + seed)
    local = dataclasses.replace(cfg.client, epochs=cfg.audit.epochs, steps=0)
    dp = None
    if epsilon > 0:
        p = cfg.privacy
        dp = LocalDP(
            max_grad_norm=p.max_grad_norm,
            delta=resolve_delta(p.target_delta, len(rows)),
            target_epsilon=epsilon,
            clipping=p.clipping,
            accountant=p.accountant,
            relation="replace-one",
            reproducible=p.reproducible_noise,
        )
        if cfg.audit.one_run_canaries:
            dp.canaries = GradientCanaries(
                list(model.parameters()),
                cfg.audit.one_run_canaries,
                p.max_grad_norm,
                sample_rate(len(rows), local.batch_size),
            )
    result = train_local(model, task, rows, local, cfg.run.seed + seed, dp)
    info = {
        "examples": len(rows),
        "epsilon": result.epsilon if dp else None,
        "noise_multiplier": result.noise_multiplier if dp else None,
        **(dp.guarantee() if dp else {"delta": None, "relation": None, "accountant": None}),
        "train_loss": result.train_loss,
        "white_box": dp.canaries.audit(dp.delta).report(
            result.epsilon, "white-box gradient canaries in DP-SGD"
        )
        if dp is not None and dp.canaries is not None
        else None,
        "test": task.evaluate(model, eval_rows, cfg.server.eval_batch_size),
        "seconds": time.perf_counter() - t0,
    }
    scores = example_scores(model, task, pool, cfg.server.eval_batch_size)
    task.save(model, folder)
    np.savez(folder / "scores.npz", **scores)
    info_file.write_text(json.dumps(info, indent=1))
    say(
        f"  trained in {info['seconds']:.0f} s: "
        f"test {task.primary_metric} {info['test'][task.primary_metric]:.3f}"
    )
    return {"model": model, "info": info, "scores": scores}


def _federated_level(cfg: Config, epsilon: float, out_dir: Path, say: Progress) -> dict[str, Any]:
    """User-level DP-FedAvg at `epsilon` with canary devices: claimed against audited ε.

    A finished simulation in the audit folder is reused (its summary), like the trained models.
    """
    folder = out_dir / "federated" / f"user-eps{epsilon:g}"
    summary_file = folder / "summary.json"
    if summary_file.is_file():
        say(f"  reusing {folder}")
        summary = json.loads(summary_file.read_text())
    else:
        say(f"federated run, user-level DP ε = {epsilon:g}, {cfg.audit.federated_rounds} rounds")
        private = dataclasses.replace(
            cfg.privacy,
            level="user",
            target_epsilon=epsilon,
            noise_multiplier=0.0,
            target_delta=0.0,
            audit_canaries=cfg.audit.one_run_canaries,
        )
        run = dataclasses.replace(cfg.run, output_dir=str(folder.parent), name=folder.name)
        server = dataclasses.replace(cfg.server, rounds=cfg.audit.federated_rounds)
        federated = dataclasses.replace(cfg, privacy=private, run=run, server=server)
        _, summary = simulate(federated)
    return {
        "label": f"user-level ε = {epsilon:g}",
        "test": summary["final"],
        "privacy": {k: v for k, v in summary["privacy"].items() if k != "audit"},
        "one_run": summary["privacy"]["audit"],
    }


def _one_run(
    info: dict[str, Any], scores: dict[str, np.ndarray], is_member: np.ndarray, n: int
) -> dict[str, Any]:
    """Claimed ε against one-run audit lower bounds: the pool's members as input-space canaries
    (black box: their losses), and the target's white-box gradient canaries when it has DP."""
    claimed = info["epsilon"] if info["epsilon"] is not None else math.inf
    delta = resolve_delta(info["delta"], n)
    black_box = audit_from_losses(scores["loss"], is_member, delta).report(
        claimed, "input-space canaries (the audit pool, members by coin flip)"
    )
    return {"input_space": black_box, "white_box": info.get("white_box")}


def _canary_attack(
    model: nn.Module,
    tokenizer: Any,
    canaries: list[Canary],
    labels: tuple[str, ...],
    audit: AuditConfig,
    seed: int,
) -> list[dict[str, Any]]:
    if not canaries:
        return []
    return canary_report(
        model,
        tokenizer,
        canaries,
        labels=labels,
        num_candidates=audit.canary_candidates,
        seed=seed,
        steps=audit.extraction_steps,
        search_budget=audit.search_budget,
    )


def attack_run(run_dir: Path, attack: str, examples: int = 2000) -> tuple[Path, dict[str, Any]]:
    """One attack on an existing run; results in RUN_DIR/attacks/.

    `mia`: loss-threshold attack, members = the training rows the model saw (the whole training
    split for `fedtrust train`, the data of every device that took part for a federated run),
    non-members = test rows (identical texts removed). `canary`: extraction and exposure of the
    canaries the run planted (`audit.plant_canaries = true`).
    """
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r} (use mia or canary)")
    cfg, task, model = load_run_model(run_dir)
    out = run_dir / "attacks"
    out.mkdir(exist_ok=True)
    if attack == "canary":
        if task.kind != "intent":
            raise ModelError(
                f"{run_dir}: canary extraction needs an intent classifier, "
                f"the run holds a {task.kind!r} model"
            )
        if not cfg.audit.plant_canaries:
            raise RunFolderError(
                f"{run_dir}: the run planted no canaries "
                "(set audit.plant_canaries = true when training)"
            )
        canaries, _ = audit_canaries(cfg, task)
        results = _canary_attack(
            model,
            AutoTokenizer.from_pretrained(run_dir / "model"),
            canaries,
            task.labels,
            cfg.audit,
            cfg.run.seed,
        )
        report = {
            "canaries": results,
            "summary": {str(k): v for k, v in summarise(results).items()},
        }
        (out / "canary.json").write_text(json.dumps(report, indent=1) + "\n")
        return out, report
    members = _members(run_dir, cfg, task)
    rng = np.random.default_rng(cfg.run.seed)
    member_keys = {tuple(r["input_ids"]) for r in members}
    non_members = [r for r in task.test if tuple(r["input_ids"]) not in member_keys]
    n = min(len(members), len(non_members), examples // 2)
    members = [members[i] for i in rng.choice(len(members), n, replace=False)]
    non_members = [non_members[i] for i in rng.choice(len(non_members), n, replace=False)]
    check_disjoint(members, non_members)
    scores = example_scores(model, task, members + non_members, cfg.server.eval_batch_size)
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    result = membership_inference(scores, is_member)["loss"]
    plot_roc(
        {"loss threshold": result.pop("roc")},
        out / "mia_roc.png",
        title=f"Membership inference: {run_dir.name}",
    )
    report = {"attack": "loss threshold", **result}
    (out / "mia.json").write_text(json.dumps(report, indent=1) + "\n")
    return out, report


def _members(run_dir: Path, cfg: Config, task: Task) -> list[dict[str, Any]]:
    """The training rows the run's model saw: all of them, or those of the devices that took
    part (by metrics.jsonl)."""
    if run_mode(run_dir) == "centralized":
        return list(task.train)
    population = cached_population(cfg)
    chosen = sorted({d for r in read_metrics(run_dir) for d in r.get("devices", [])})
    if not chosen:
        raise RunFolderError(f"{run_dir}: metrics.jsonl names no device that took part")
    return [population.task.train[i] for d in chosen for i in population.parts[d]]
