"""The fairness experiments behind `fedtrust fairness sensitivity` and `bias-demo`.

`run_sensitivity` audits a trained classifier on EEC sentences (prediction sensitivity and the
counterfactual gap) and writes the report; `run_bias_demo` trains a gender-biased and a
counterfactually augmented classifier on EEC data and audits both (the data construction is
`fedtrust.fairness.bias_demo`). The metrics are `fedtrust.fairness.sensitivity`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedtrust.errors import ModelError
from fedtrust.fairness.bias_demo import build_demo_data
from fedtrust.fairness.eec import (
    BUNDLED_EEC,
    REQUIRED_GROUPS,
    counterparts,
    group_columns,
    load_eec,
)
from fedtrust.fairness.psm import accuracy, fine_tune, gender_data, train_psm
from fedtrust.fairness.sensitivity import audit, check_compatible
from fedtrust.tasks.base import freeze_lower
from fedtrust.tasks.models import quiet_transformers, resolve_model

from .fairness_report import report_folder, write_report
from .run_folder import load_classifier

Log = Callable[[str], None]


def run_sensitivity(
    model: Path,
    psm: Path | None = None,
    out: Path | None = None,
    examples: int = 200,
    psm_steps: int = 150,
    batch_size: int = 32,
    seed: int = 0,
    log: Log | None = None,
) -> tuple[dict[str, Any], Path]:
    """Audit the classifier in `model` (a run folder or model folder) on `examples` EEC
    sentences that have a counterfactual, with the PSM in `psm` or one trained here on the
    other EEC sentences (saved to OUT/psm). Writes sensitivity.json/.md/.png to `out`
    (default MODEL/sensitivity); returns the audit of the model and the report folder."""
    say = log or (lambda _msg: None)
    tc, tokenizer, model_dir = load_classifier(model)
    out_dir = out or model / "sensitivity"
    rows = load_eec()
    mates = counterparts(rows)
    order = np.random.default_rng(seed).permutation(len(rows))
    chosen = [int(i) for i in order if mates[i] is not None][:examples]
    taken = set(chosen)
    psm_info: dict[str, Any] = {}
    if psm is not None:
        psm_model, psm_tokenizer, psm_dir = load_classifier(psm)
        check_compatible(tc, psm_model, tokenizer, psm_tokenizer, str(model_dir), str(psm_dir))
        psm_info["model"] = str(psm_dir)
        psm_info["same_embeddings_as_tc"] = bool(
            torch.equal(tc.get_input_embeddings().weight, psm_model.get_input_embeddings().weight)
        )
        if not psm_info["same_embeddings_as_tc"]:
            say(
                "note: the PSM's embedding table differs from the classifier's; both are fed "
                "the classifier's token embeddings"
            )
    else:
        say(f"training a protected-status model on EEC gender ({psm_steps} steps)")
        train_rows = [r for i, r in enumerate(rows) if i not in taken]
        layers = getattr(tc.config, "num_hidden_layers", 2)
        psm_model, psm_info = train_psm(
            tc, tokenizer, *gender_data(train_rows), psm_steps, freeze_layers=max(0, layers - 2)
        )
        psm_dir = report_folder(out_dir / "psm")
        psm_model.save_pretrained(psm_dir)
        tokenizer.save_pretrained(psm_dir)
        psm_info["model"] = str(out_dir / "psm")
        say(f"saved it to {out_dir / 'psm'} (reuse it with --psm)")
    test = [rows[i] for i in chosen]
    psm_info["gender_accuracy"] = accuracy(psm_model, tokenizer, *gender_data(test))
    say(f"measuring {len(test)} EEC sentences")
    result = audit(
        str(model_dir),
        tc,
        psm_model,
        tokenizer,
        [r.sentence for r in test],
        [rows[mates[i]].sentence for i in chosen],
        group_columns(test),
        REQUIRED_GROUPS,
        batch_size=batch_size,
    )
    write_report(out_dir, {"psm": psm_info, "models": [result]}, f"Fairness of {model}")
    return result, out_dir


def run_bias_demo(
    model: str = "minilm",
    correlation: float = 0.9,
    steps: int = 80,
    psm_steps: int = 40,
    batch_size: int = 32,
    freeze_layers: int = 5,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    test_examples: int = 400,
    seed: int = 0,
    eec_path: Path | str = BUNDLED_EEC,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train the biased and the augmented classifier and one PSM; audit both classifiers.

    Returns {"settings", "data", "psm", "models": [biased, augmented], "seconds"}, the `models`
    entries as from `sensitivity.audit` plus "train_loss" and "train_seconds".
    """
    began = time.perf_counter()
    say = log or (lambda _msg: None)
    quiet_transformers()
    name = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:  # no such folder or hub id, or no tokenizer in it
        raise ModelError(f"{model}: cannot load a tokenizer ({err})") from err
    data = build_demo_data(load_eec(eec_path), correlation, test_examples=test_examples, seed=seed)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(seed)
        m = AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
        freeze_lower(m, embeddings=True, layers=freeze_layers)
        return m

    t0 = time.perf_counter()
    say(f"training the protected-status model ({psm_steps} steps)")
    psm, psm_info = train_psm(
        fresh(), tokenizer, *data.psm, psm_steps, batch_size, freeze_layers, lr, head_lr, seed
    )
    psm_info["train_seconds"] = time.perf_counter() - t0
    test_texts = [r.sentence for r in data.test]
    psm_info["gender_accuracy"] = accuracy(psm, tokenizer, *gender_data(data.test))

    groups = group_columns(data.test)
    labels = [int(r.emotion == "joy") for r in data.test]
    swapped = [r.sentence for r in data.test_counterparts]
    results = []
    for label, (texts, ys) in (("biased", data.biased), ("augmented", data.augmented)):
        say(f"training the {label} classifier ({steps} steps on {len(texts)} sentences)")
        t0 = time.perf_counter()
        tc = fresh()
        info = fine_tune(tc, tokenizer, texts, ys, steps, batch_size, lr, head_lr, seed)
        seconds = time.perf_counter() - t0
        say(f"auditing the {label} classifier on {len(test_texts)} held-out sentences")
        result = audit(
            label, tc, psm, tokenizer, test_texts, swapped, groups, REQUIRED_GROUPS, labels
        )
        result.update(info, train_seconds=seconds)
        results.append(result)
    return {
        "settings": {
            "model": model,
            "correlation": correlation,
            "steps": steps,
            "psm_steps": psm_steps,
            "batch_size": batch_size,
            "freeze_layers": freeze_layers,
            "lr": lr,
            "head_lr": head_lr,
            "seed": seed,
        },
        "data": data.stats(),
        "psm": psm_info,
        "models": results,
        "seconds": time.perf_counter() - began,
    }
