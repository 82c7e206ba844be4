"""Canary extraction: known answers on a tiny BERT that memorised a secret, and on a fresh one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from fedtrust.privacy.attacks.canary import (
    DIGITS,
    Canary,
    canary_report,
    canary_rows,
    decoy_rows,
    exposure,
    extract_secret,
    make_canaries,
    summarise,
)
from fedtrust.simulations.canaries import audit_canaries
from fedtrust.simulations.config import load_config
from fedtrust.tasks import build_task
from fedtrust.tasks.intent import IntentTask

LABELS = ("alarm", "pin", "weather")
SECRET = Canary("my pin code is", "3 7 1 9", "alarm", repetitions=30)


def _task(folder, rows: list[dict]) -> IntentTask:
    return IntentTask(
        kind="intent",
        train=rows,
        test=[],
        pad_id=0,
        primary_metric="accuracy",
        model_name=str(folder),
        labels=LABELS,
        freeze_embeddings=False,
    )


def _model(task: IntentTask, seed: int = 0) -> nn.Module:
    model = task.build_model(seed)
    for module in model.modules():  # no dropout: memorise faster
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def _best_secret(model: nn.Module, tokenizer) -> str:
    """The secret the model finds most canary-like, by scoring all 10^4 (no attack code)."""
    secrets = [" ".join(f"{i:04d}") for i in range(10**4)]
    label = LABELS.index(SECRET.label)
    best, best_score = "", -math.inf
    with torch.no_grad():
        for start in range(0, len(secrets), 2000):
            chunk = secrets[start : start + 2000]
            batch = tokenizer([f"{SECRET.prefix} {x}" for x in chunk], return_tensors="pt")
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            others = torch.cat([logits[:, :label], logits[:, label + 1 :]], dim=1)
            odds = logits[:, label] - torch.logsumexp(others, dim=1)
            top = int(odds.argmax())
            if float(odds[top]) > best_score:
                best, best_score = chunk[top], float(odds[top])
    return best


@pytest.fixture(scope="module")
def memorised(tiny_bert, tokenizer) -> nn.Module:
    """Trained until it tells the canary ("alarm") from the same prefix with any other secret
    ("pin"): 100 random other secrets and every secret one or two digits away, plus fillers.

    Training goes on (10 epochs at a time, up to 200) until the true secret is the model's
    best of all 10^4 by exhaustive scoring: the known answer the attacks must then find."""
    rng = np.random.default_rng(0)
    pin = LABELS.index("pin")

    def row(text: str, label: int) -> dict:
        return {"input_ids": tokenizer(text)["input_ids"], "labels": label}

    rows = canary_rows([SECRET], tokenizer, LABELS, max_length=32)
    others = {" ".join(rng.choice(list(DIGITS), 4)) for _ in range(100)}
    for a in range(4):  # the hard negatives (one or two digits away) make every digit matter
        for b in range(a, 4):
            for x in DIGITS:
                for y in DIGITS:
                    swap = {a: x, b: y}
                    others.add(" ".join(swap.get(i, d) for i, d in enumerate(SECRET.tokens)))
    rows += [row(f"{SECRET.prefix} {s}", pin) for s in sorted(others - {SECRET.secret})]
    words = "rain sun cloud forecast snow wind cold warm today tomorrow".split()
    rows += [row("will it " + " ".join(rng.choice(words, 3)), 2) for _ in range(30)]
    task = _task(tiny_bert, rows)
    model = _model(task)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3, fused=True)  # fast on CPU
    for epoch in range(1, 201):
        model.train()
        for batch in task.batches(rows, 32, rng):
            model(**batch).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        if epoch >= 20 and epoch % 10 == 0:
            model.eval()
            if _best_secret(model, tokenizer) == SECRET.secret:
                return model
    raise AssertionError("the tiny BERT did not memorise the secret in 200 epochs")


def test_memorised_secret_is_extracted_and_exposed(memorised, tokenizer) -> None:
    found = extract_secret(memorised, tokenizer, SECRET)
    assert found.exact, found
    assert found.secret == SECRET.secret and found.token_accuracy == 1.0
    # the relaxation alone (argmax decoding, no search or coordinate ascent) gets there too
    relaxed = extract_secret(memorised, tokenizer, SECRET, search_budget=1, refine_passes=0)
    assert relaxed.token_accuracy >= 0.75, relaxed
    full = exposure(memorised, tokenizer, SECRET, num_candidates=None)
    assert full["space"] == full["candidates"] == 10**4
    assert full["rank"] <= 3 and full["exposure"] > 11.5, full
    sampled = exposure(memorised, tokenizer, SECRET, num_candidates=500)
    assert sampled["candidates"] == 501
    assert sampled["exposure"] > 8.0, sampled  # log2(501) = 8.97 when no sample beats it


def test_fresh_model_leaks_nothing(tiny_bert, tokenizer) -> None:
    model = _model(_task(tiny_bert, []), seed=1).eval()
    canaries = make_canaries(LABELS, repetitions=(1,), per_level=4, seed=1)
    results = canary_report(model, tokenizer, canaries, steps=40, restarts=4)
    summary = summarise(results)
    assert list(summary) == [1] and summary[1]["canaries"] == 4
    assert summary[1]["exact_rate"] == 0.0
    assert summary[1]["token_accuracy"] <= 0.5  # chance: 0.1
    assert summary[1]["exposure"] < 5.0  # chance: 1/ln 2 = 1.44 bits on average


class _CountingModel(nn.Module):
    """Logit of label 0 = how many secret digits match `truth`: a known, smooth landscape."""

    def __init__(self, tokenizer, truth: str) -> None:
        super().__init__()
        digits = [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
        self.embed = nn.Embedding(len(tokenizer), 10)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[digits] = torch.eye(10)
        self.register_buffer("truth", torch.eye(10)[[int(d) for d in truth.split()]])
        self.config = type("Config", (), {"label2id": {"alarm": 0, "pin": 1}})()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        secret = x[:, -1 - len(self.truth) : -1]  # [CLS] prefix secret [SEP]
        matches = (secret * self.truth).sum(dim=(1, 2))
        logits = torch.stack([matches, torch.zeros_like(matches)], dim=-1)
        return type("Output", (), {"logits": logits})()


def test_exposure_and_extraction_known_answers(tokenizer) -> None:
    canary = Canary("call me on", "5 0 5 8", "alarm")
    model = _CountingModel(tokenizer, canary.secret).train()
    full = exposure(model, tokenizer, canary, num_candidates=None)
    assert full == {"exposure": math.log2(10**4), "rank": 1.0, "candidates": 10**4, "space": 10**4}
    sampled = exposure(model, tokenizer, canary, num_candidates=999)
    assert sampled["rank"] == pytest.approx(10.0)  # nothing beats it: 10**4 / (999 + 1)
    assert sampled["exposure"] == pytest.approx(math.log2(1000))
    wrong = exposure(
        model, tokenizer, Canary("call me on", "5 0 5 9", "alarm"), num_candidates=None
    )
    assert wrong["rank"] == pytest.approx(2 + 0.5 * 35)  # the truth beats it, 35 others tie
    found = extract_secret(model, tokenizer, canary, search_budget=1, refine_passes=0)
    assert found.exact and found.label_log_odds > math.log(0.9 / 0.1)
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored


def test_canary_rows_repeat_each_canary(tokenizer) -> None:
    canaries = make_canaries(LABELS, repetitions=(1, 3), per_level=2, seed=0)
    assert [c.repetitions for c in canaries] == [1, 1, 3, 3]
    assert len({c.secret for c in canaries}) == 4 and all(c.label in LABELS for c in canaries)
    rows = canary_rows(canaries, tokenizer, LABELS, max_length=32)
    assert [r["canary"] for r in rows] == [0, 1, 2, 2, 2, 3, 3, 3]
    first = rows[0]
    assert tokenizer.decode(first["input_ids"], skip_special_tokens=True) == canaries[0].text
    assert first["labels"] == LABELS.index(canaries[0].label)
    rows[2]["input_ids"].append(0)  # rows are independent copies
    assert rows[3]["input_ids"] != rows[2]["input_ids"]


def test_decoys_share_the_prefix_but_never_the_secret_or_the_label(tokenizer) -> None:
    canaries = [
        Canary("my pin code is", "1 2 3 4", "alarm", 5),
        Canary("my pin code is", "4 3 2 1", "pin", 1),
        Canary("call me on", "5 5 5 5", "alarm", 1),
    ]
    rows = decoy_rows(canaries, tokenizer, LABELS, max_length=32, per_prefix=30, seed=3)
    assert len(rows) == 60 and all(r["canary"] == -1 for r in rows)
    texts = [tokenizer.decode(r["input_ids"], skip_special_tokens=True) for r in rows]
    pin = [t for t in texts if t.startswith("my pin code is ")]
    assert len(pin) == 30 and all(t.startswith("call me on ") for t in texts if t not in pin)
    secrets = {" ".join(t.split()[-4:]) for t in texts}
    assert len(secrets) == 60 and not secrets & {c.secret for c in canaries}
    assert {r["labels"] for r, t in zip(rows, texts) if t in pin} == {LABELS.index("weather")}
    call_labels = {r["labels"] for r, t in zip(rows, texts) if t not in pin}
    assert call_labels == {LABELS.index("pin"), LABELS.index("weather")}  # never "alarm"
    groups = {}  # decoys come as reorderings of the same digits
    for secret in secrets:
        groups.setdefault("".join(sorted(secret.split())), []).append(secret)
    assert max(len(g) for g in groups.values()) > 1 and len(groups) < 60
    assert decoy_rows(canaries, tokenizer, LABELS, 32, per_prefix=30, seed=3) == rows
    assert decoy_rows(canaries, tokenizer, LABELS, 32, per_prefix=0) == []
    with pytest.raises(ValueError, match="no label left for the decoys of prefix"):
        decoy_rows([Canary("a", "1", n) for n in LABELS], tokenizer, LABELS, 32, per_prefix=1)
    with pytest.raises(ValueError, match="12 decoys per prefix do not fit in 10 secrets"):
        decoy_rows([Canary("a", "1", "pin")], tokenizer, LABELS, 32, per_prefix=12)


def test_bad_canaries_are_clear_errors(tokenizer) -> None:
    with pytest.raises(ValueError, match="repetitions must be an integer >= 1, got 0"):
        Canary("my pin code is", "1 2 3 4", "alarm", repetitions=0)
    with pytest.raises(ValueError, match="repetitions must be integers >= 1, got 0"):
        make_canaries(LABELS, repetitions=(0, 5))
    unknown = Canary("my pin code is", "1 2 3 4", "banking")
    with pytest.raises(ValueError, match="'banking' is not a label of the task"):
        canary_rows([unknown], tokenizer, LABELS, max_length=32)
    multi = Canary("my pin code is", "3719 3 4", "alarm")
    with pytest.raises(ValueError, match=r"one token of the tokenizer: '3719' -> \['37', '##19'\]"):
        canary_rows([multi], tokenizer, LABELS, max_length=32)
    with pytest.raises(ValueError, match="over max_length"):
        canary_rows([Canary("my pin code is", "1 2 3 4", "alarm")], tokenizer, LABELS, 5)
    model = _CountingModel(tokenizer, "1 2 3 4")
    with pytest.raises(ValueError, match="one token of the tokenizer"):
        extract_secret(
            model, tokenizer, Canary("call me on", "1 2 3 4", "alarm"), alphabet=["0", "12x"]
        )
    with pytest.raises(ValueError, match="not a label of the task"):
        exposure(model, tokenizer, Canary("call me on", "1 2 3 4", "weather"))
    with pytest.raises(ValueError, match=r"secret tokens \['3', '4'\] .* not in the alphabet"):
        exposure(model, tokenizer, Canary("call me on", "1 2 3 4", "alarm"), alphabet=["1", "2"])


def test_the_canaries_a_config_asks_for(tiny_bert, intent_jsonl):
    base = [f'task.dataset="{intent_jsonl}"', f'task.model="{tiny_bert}"']
    cfg = load_config(
        None,
        [
            *base,
            "audit.canary_repetitions=[2, 3]",
            "audit.canaries_per_level=1",
            "audit.canary_decoys=4",
        ],
    )
    task = build_task(cfg.task, seed=cfg.run.seed)
    canaries, rows = audit_canaries(cfg, task)
    assert [c.repetitions for c in canaries] == [2, 3]
    assert {c.label for c in canaries} <= set(task.labels)
    # each canary `repetitions` times, then 4 decoys for each of the 2 prefixes
    assert [r["canary"] for r in rows] == [0, 0, 1, 1, 1] + [-1] * 8
    assert audit_canaries(cfg, task) == (canaries, rows)  # deterministic: planted = attacked
    none = load_config(None, [*base, "audit.canaries_per_level=0"])
    assert audit_canaries(none, task) == ([], [])
