"""The privacy audit: how much do models trained at several privacy levels actually leak?

`run_audit` draws an audit pool from the training split; a random half are the *members*. For
every level of `audit.epsilons` (0 = no DP) a target model is trained on the members plus the
planted canaries (eDP-SGD for ε > 0); `audit.shadows` shadow models, each trained without DP on
a random half of the pool, calibrate the attacks. Each target is then attacked:

- membership inference on members vs the other half of the pool: loss threshold, reference
  (difficulty-calibrated by the shadows that did not see the example), LiRA online and offline;
- canary extraction: model inversion of every canary's secret and its exposure.

Every trained model and its scores are saved under `models/`; a re-run with the same output
folder reuses them, so a stopped audit loses at most the model it was training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .accounting import default_delta
from .attacks.canary import (
    Canary,
    canary_report,
    canary_rows,
    decoy_rows,
    make_canaries,
    summarise,
)
from .attacks.metrics import attack_metrics, roc_points
from .attacks.mia import lira_offline, lira_online, loss_attack, reference_attack
from .attacks.one_run import GradientCanaries, audit_from_losses, split_canaries
from .attacks.scores import example_scores

Progress = Callable[[str], None]


def check_disjoint(members: list[dict], non_members: list[dict]) -> None:
    """A non-member identical to a member would be scored as both: refuse the split."""
    seen = {tuple(r["input_ids"]) for r in members}
    clash = [i for i, r in enumerate(non_members) if tuple(r["input_ids"]) in seen]
    if clash:
        raise ValueError(
            f"{len(clash)} non-member rows are identical to member rows (first: non-member "
            f"#{clash[0]}); members and non-members must not overlap"
        )


def membership_inference(
    target: dict[str, np.ndarray],
    is_member: np.ndarray,
    shadows: list[dict[str, np.ndarray]] | None = None,
    shadow_in: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Every attack the inputs allow: metrics and ROC points per attack.

    `target`/`shadows` hold `example_scores` output on the same rows; `shadow_in[s, i]` says
    whether shadow s trained on row i.
    """
    scores = {"loss": loss_attack(target["loss"])}
    if shadows:
        conf = np.stack([s["confidence"] for s in shadows])
        loss = np.stack([s["loss"] for s in shadows])
        out = ~shadow_in
        if out.any():  # examples no shadow left out: the mean over all left-out losses
            out_loss = np.where(out, loss, np.nan)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ref = np.nanmean(out_loss, axis=0)
            ref = np.where(np.isnan(ref), np.nanmean(out_loss), ref)
            scores["reference"] = reference_attack(target["loss"], ref[None, :])
        scores["lira_offline"] = lira_offline(target["confidence"], conf, shadow_in)
        if shadow_in.any() and out.any():
            scores["lira_online"] = lira_online(target["confidence"], conf, shadow_in)
    results = {}
    for name, s in scores.items():
        fpr, tpr = roc_points(s, is_member)
        results[name] = {**attack_metrics(s, is_member), "roc": (fpr, tpr)}
    return results


def run_audit(cfg, progress: Progress | None = None) -> tuple[Path, dict[str, Any]]:
    """Train, attack and report; returns the output folder and the report dict."""
    from transformers import AutoTokenizer

    from fedtrust.tasks import build_task
    from fedtrust.tasks.models import quiet_transformers

    from .audit_report import write_audit_report

    say = progress or (lambda message: None)
    began = time.perf_counter()
    torch.set_num_threads(max(1, cfg.client.num_cpus))
    quiet_transformers()
    audit = cfg.audit
    if cfg.task.kind != "intent":
        raise ValueError(
            f"audit: canary extraction needs a text classifier (task.kind = 'intent'), "
            f"got task.kind = {cfg.task.kind!r}"
        )
    name = cfg.run.name or datetime.now().strftime("audit-%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run.output_dir) / name
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    from fedtrust.simulations.runner import to_toml

    (out_dir / "config.toml").write_text(to_toml(cfg))

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


def _trained(cfg, task, rows, epsilon, folder: Path, pool, eval_rows, seed, say) -> dict[str, Any]:
    """Train one model (or reload it from `folder`), with its scores on the pool."""
    from fedtrust.clients.train import LocalDP, sample_rate, train_local

    info_file = folder / "info.json"
    if info_file.is_file():
        say(f"  reusing {folder}")
        model = _model_class(task).from_pretrained(folder)
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
            delta=p.target_delta or default_delta(len(rows)),
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


def _federated_level(cfg, epsilon: float, out_dir: Path, say: Progress) -> dict[str, Any]:
    """User-level DP-FedAvg at `epsilon` with canary devices: claimed against audited ε.

    A finished simulation in the audit folder is reused (its summary), like the trained models.
    """
    from fedtrust.simulations.runner import simulate

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
    delta = info["delta"] or default_delta(n)
    black_box = audit_from_losses(scores["loss"], is_member, delta).report(
        claimed, "input-space canaries (the audit pool, members by coin flip)"
    )
    return {"input_space": black_box, "white_box": info.get("white_box")}


def _canary_attack(
    model, tokenizer, canaries: list[Canary], labels, audit, seed: int
) -> list[dict]:
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


def audit_canaries(cfg, task) -> tuple[list[Canary], list[dict[str, Any]]]:
    """The canaries `cfg.audit` asks for and their encoded training rows (deterministic): each
    canary `repetitions` times, then `audit.canary_decoys` decoys per prefix (`canary` = -1)."""
    from transformers import AutoTokenizer

    audit = cfg.audit
    if task.kind != "intent" or not audit.canaries_per_level:
        return [], []
    canaries = make_canaries(
        task.labels,
        repetitions=tuple(audit.canary_repetitions),
        per_level=audit.canaries_per_level,
        seed=cfg.run.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(task.model_name)
    rows = canary_rows(canaries, tokenizer, task.labels, cfg.task.max_length)
    decoys = decoy_rows(
        canaries, tokenizer, task.labels, cfg.task.max_length, audit.canary_decoys, cfg.run.seed
    )
    return canaries, rows + decoys


def load_run_model(run_dir: Path):
    """(config, task, trained model) of a finished `fedtrust simulate` / `train` run."""
    from fedtrust.simulations.runner import load_run_config
    from fedtrust.tasks import build_task

    cfg = load_run_config(run_dir)
    if not (run_dir / "model" / "config.json").is_file():
        raise ValueError(
            f"{run_dir}: no trained model (model/config.json missing; did the run finish?)"
        )
    task = build_task(cfg.task, seed=cfg.run.seed)
    return cfg, task, _model_class(task).from_pretrained(run_dir / "model")


def _model_class(task):
    """The transformers class a saved model of `task` loads with (no pretrained weights read)."""
    from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel

    return AutoModelForSequenceClassification if task.kind == "intent" else GPT2LMHeadModel


def attack_run(run_dir: Path, attack: str, examples: int = 2000) -> tuple[Path, dict[str, Any]]:
    """One attack on an existing run; results in RUN_DIR/attacks/.

    `mia`: loss-threshold attack, members = the training rows the model saw (the whole training
    split for `fedtrust train`, the data of every device that took part for a federated run),
    non-members = test rows (identical texts removed). `canary`: extraction and exposure of the
    canaries the run planted (`audit.plant_canaries = true`).
    """
    from .attacks.metrics import plot_roc

    if attack not in ("mia", "canary"):
        raise ValueError(f"unknown attack {attack!r} (use mia or canary)")
    cfg, task, model = load_run_model(run_dir)
    out = run_dir / "attacks"
    out.mkdir(exist_ok=True)
    if attack == "canary":
        if task.kind != "intent":
            raise ValueError(
                f"{run_dir}: canary extraction needs an intent classifier, "
                f"the run holds a {task.kind!r} model"
            )
        if not cfg.audit.plant_canaries:
            raise ValueError(
                f"{run_dir}: the run planted no canaries "
                "(set audit.plant_canaries = true when training)"
            )
        from transformers import AutoTokenizer

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


def _members(run_dir: Path, cfg, task) -> list[dict[str, Any]]:
    summary_file = run_dir / "summary.json"
    mode = json.loads(summary_file.read_text()).get("mode") if summary_file.is_file() else None
    if mode == "centralized":
        return list(task.train)
    from fedtrust.server.federation import read_metrics
    from fedtrust.simulations.population import cached_population

    population = cached_population(cfg)
    chosen = sorted({d for r in read_metrics(run_dir) for d in r.get("devices", [])})
    if not chosen:
        raise ValueError(f"{run_dir}: metrics.jsonl names no device that took part")
    return [population.task.train[i] for d in chosen for i in population.parts[d]]
