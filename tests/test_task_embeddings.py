"""Task.embed / Task.decode (what cohort discovery reads) and the validation split."""

from __future__ import annotations

import json
import pickle

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from fedtrust.errors import DataError
from fedtrust.tasks import build_task, load_raw
from fedtrust.tasks.data import DATA_DIR
from fedtrust.tasks.intent import build_intent_task
from fedtrust.tasks.lm import build_lm_task
from fedtrust.tasks.spec import TaskSpec

TEXTS = ["to be or not to be", "a horse a horse", "my kingdom for a horse", "now is the winter"]


@pytest.fixture(scope="module")
def intent_task(tiny_bert, intent_jsonl):
    return build_task(TaskSpec(dataset=str(intent_jsonl), model=str(tiny_bert)))


@pytest.fixture(scope="module")
def lm_task():
    raw = DatasetDict(
        {
            "train": Dataset.from_dict({"text": TEXTS}),
            "test": Dataset.from_dict({"text": ["to be a king"]}),
        }
    )
    spec = TaskSpec(kind="lm", max_length=8, lm_layers=1, lm_width=16, lm_heads=2)
    return build_lm_task(raw, spec)


def _ragged(rows: list[dict]) -> list[dict]:
    """Six rows of different lengths (the first rows cut short), so a batch of them is padded."""
    out = [{**r, "input_ids": r["input_ids"][: 2 + i]} for i, r in enumerate(rows[:6])]
    assert len({len(r["input_ids"]) for r in out}) > 2
    return out


@pytest.mark.parametrize("kind", ["intent", "lm"])
def test_embed_is_the_masked_mean_and_ignores_padding(kind, intent_task, lm_task):
    task = intent_task if kind == "intent" else lm_task
    model = task.build_model(seed=0)
    model.train()  # embed must switch to eval (no dropout) and back
    rows = _ragged(task.train + task.test)
    emb = task.embed(model, rows, batch_size=4)  # batches cross the row order
    assert model.training
    hidden = model.config.hidden_size
    assert emb.shape == (len(rows), hidden) and emb.dtype == np.float32
    assert np.array_equal(emb, task.embed(model, rows, batch_size=4))  # deterministic
    model.eval()
    with torch.no_grad():
        for i, row in enumerate(rows):
            alone = task.embed(model, [row])[0]
            assert np.abs(alone - emb[i]).max() < 1e-5  # same in a padded batch and alone
            ids = torch.tensor([row["input_ids"]])
            out = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            assert np.abs(out.mean(0).numpy() - alone).max() < 1e-5
    assert task.embed(model, []).shape == (0, hidden)


def test_decode_round_trips_intent_text(intent_task, intent_jsonl):
    texts = {json.loads(line)["text"].lower() for line in intent_jsonl.read_text().splitlines()}
    decoded = {intent_task.decode(row) for row in intent_task.train + intent_task.test}
    assert decoded == texts
    # the cached tokenizer is not pickled (tasks travel to workers); it reloads on use
    copy = pickle.loads(pickle.dumps(intent_task))
    assert "tokenizer" not in copy.__dict__
    assert copy.decode(intent_task.test[0]) == intent_task.decode(intent_task.test[0])


def test_decode_round_trips_lm_text(lm_task):
    assert "".join(lm_task.decode(r) for r in lm_task.train) == "".join(
        t[i : i + 8] for t in TEXTS for i in range(0, len(t), 8) if len(t[i : i + 8]) >= 2
    )
    assert lm_task.decode({"input_ids": lm_task.train[0]["input_ids"] + [0, 0]}) == "to be or"
    assert lm_task.validation == []


def test_bundled_clinc150_brings_its_validation_split():
    lines = (DATA_DIR / "clinc150" / "validation.jsonl").read_text().splitlines()
    vendored = [json.loads(line) for line in lines if line.strip()]
    raw = load_raw("clinc150")
    assert set(raw) == {"train", "validation", "test"}
    assert (len(raw["train"]), len(raw["test"])) == (15_100, 5_500)
    assert len(raw["validation"]) == len(vendored) == 3_100
    labels = raw["validation"].to_dict()["label"]
    assert labels.count("oos") == sum(r["label"] == "oos" for r in vendored) == 100
    assert raw["validation"][0]["text"] == vendored[0]["text"]


def test_a_user_file_has_no_validation_split(intent_jsonl, intent_task):
    assert set(load_raw(str(intent_jsonl))) == {"train", "test"}
    assert intent_task.validation == []


def test_a_hub_validation_split_is_kept(monkeypatch):
    hub = DatasetDict(
        {
            "train": Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": ["a"] * 20}),
            "validation": Dataset.from_dict({"text": ["v0", "v1"], "label": ["a", "a"]}),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name: hub)
    raw = load_raw("someone/intents", test_fraction=0.25)
    assert (len(raw["train"]), len(raw["validation"]), len(raw["test"])) == (15, 2, 5)
    assert raw["validation"].to_dict()["text"] == ["v0", "v1"]


def _raw(validation_labels: list[str]) -> DatasetDict:
    def split(labels):
        return Dataset.from_dict({"text": [f"set the {x} now" for x in labels], "label": labels})

    return DatasetDict(
        {
            "train": split(["alarm", "music"] * 5),
            "validation": split(validation_labels),
            "test": split(["music", "alarm"]),
        }
    )


def test_the_intent_task_encodes_validation_like_test(tiny_bert):
    spec = TaskSpec(dataset="mine", model=str(tiny_bert))
    task = build_intent_task(_raw(["music", "alarm", "music"]), spec)
    assert [r["labels"] for r in task.validation] == [1, 0, 1]
    assert task.decode(task.validation[0]) == "set the music now"
    with pytest.raises(DataError, match="mine: validation labels never seen in training"):
        build_intent_task(_raw(["music", "weather"]), spec)
