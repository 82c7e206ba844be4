"""A user's own train / test / validation files (task.test_dataset, task.validation_dataset)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict

from fedtrust.errors import DataError
from fedtrust.tasks import (
    TaskSpec,
    build_task,
    load_raw,
    oos_rejection,
    rejection_metrics,
    score_rows,
    tune_threshold,
)

WORDS = {"alarm": "wake alarm clock", "music": "play song album", "oos": "banana tax moon"}


def _rows(labels: list[str], tag: str) -> list[dict[str, str]]:
    return [
        {"utt": f"{WORDS[x].split()[i % 3]} {tag} {i}", "intent": x, "user": f"{tag}{i % 3}"}
        for i, x in enumerate(labels)
    ]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def files(tmp_path):
    train = _rows(["music", "alarm", "oos"] * 4, "tr")  # 12 rows, 3 labels
    test = _rows(["oos", "music", "alarm", "music"], "te")
    validation = _rows(["alarm", "oos", "oos"], "va")
    return (
        _jsonl(tmp_path / "train.jsonl", train),
        _csv(tmp_path / "test.csv", test),
        _jsonl(tmp_path / "validation.jsonl", validation),
        (train, test, validation),
    )


def _spec(model, train, **extra) -> TaskSpec:
    columns = {"text_column": "utt", "label_column": "intent", "device_column": "user"}
    return TaskSpec(dataset=str(train), model=str(model), **columns, **extra)


def test_train_test_and_validation_files_round_trip_into_the_task(tiny_bert, files):
    train_path, test_path, val_path, (train, test, validation) = files
    spec = _spec(tiny_bert, train_path, test_dataset=str(test_path))
    spec.validation_dataset = str(val_path)
    task = build_task(spec, seed=0)
    assert task.labels == ("alarm", "music", "oos")  # the training labels, sorted
    ids = {name: i for i, name in enumerate(task.labels)}
    # all of the training file is training data: test_fraction is not used
    assert len(task.train) == len(train) == 12
    for split, rows in ((task.train, train), (task.test, test), (task.validation, validation)):
        assert [r["labels"] for r in split] == [ids[r["intent"]] for r in rows]
        assert [r["device"] for r in split] == [r["user"] for r in rows]
        assert [task.decode(r) for r in split] == [r["utt"] for r in rows]


def test_without_a_validation_file_a_user_file_has_no_validation(tiny_bert, files):
    train_path, test_path, _, (train, test, _) = files
    task = build_task(_spec(tiny_bert, train_path, test_dataset=str(test_path)))
    assert (len(task.train), len(task.test), task.validation) == (len(train), len(test), [])


def test_a_validation_file_alone_keeps_the_test_fraction_hold_out(tiny_bert, files):
    train_path, _, val_path, (train, _, validation) = files
    task = build_task(_spec(tiny_bert, train_path, validation_dataset=str(val_path)))
    assert (len(task.train), len(task.test)) == (len(train) - 2, 2)  # ceil(0.1 * 12) held out
    assert len(task.validation) == len(validation)


def test_the_rejection_threshold_is_tuned_on_the_validation_file(tiny_bert, files):
    train_path, test_path, val_path, (_, test, validation) = files
    spec = _spec(tiny_bert, train_path, test_dataset=str(test_path))
    spec.validation_dataset = str(val_path)
    task = build_task(spec)
    model = task.build_model(seed=0)
    report = oos_rejection(task, model)
    oos = task.labels.index("oos")
    scores = score_rows(task, model, task.validation)
    assert len(scores.gold) == len(validation) and list(scores.gold) == [0, oos, oos]
    assert report["threshold"] == tune_threshold(scores, oos)
    assert report["validation"] == rejection_metrics(scores, oos, report["threshold"])
    assert len(score_rows(task, model, task.test).gold) == len(test)


def test_the_hold_out_is_unchanged_for_a_single_file(tmp_path):
    rows = _rows(["music", "alarm"] * 15, "x")
    raw = load_raw(
        str(_jsonl(tmp_path / "one.jsonl", rows)),
        seed=3,
        label_column="intent",
        text_column="utt",
        device_column="user",
    )
    reference = Dataset.from_list(rows).train_test_split(test_size=0.1, seed=3)
    assert raw["test"].to_dict()["text"] == reference["test"].to_dict()["utt"]
    assert raw["train"].to_dict()["text"] == reference["train"].to_dict()["utt"]


def test_a_test_label_never_seen_in_training_names_the_file_line_and_label(tiny_bert, files):
    train_path, _, _, _ = files
    bad = _jsonl(train_path.parent / "bad_test.jsonl", _rows(["music", "alarm"], "t"))
    bad.write_text(bad.read_text() + json.dumps({"utt": "hi", "intent": "weather", "user": "u"}))
    with pytest.raises(DataError) as err:
        build_task(_spec(tiny_bert, train_path, test_dataset=str(bad)))
    message = str(err.value)
    assert message.startswith(f"{bad}:3: label 'weather' never seen in training ({train_path}")
    assert "\n" not in message


def test_a_validation_label_never_seen_in_training_is_refused(tiny_bert, files):
    train_path, _, _, _ = files
    bad = _csv(train_path.parent / "val.csv", _rows(["music", "alarm", "alarm"], "v"))
    bad.write_text(bad.read_text().replace(",alarm,", ",snooze,", 1))
    with pytest.raises(DataError, match=rf"^{bad}:3: label 'snooze' never seen in training"):
        build_task(_spec(tiny_bert, train_path, validation_dataset=str(bad)))


@pytest.mark.parametrize("column", ["utt", "intent", "user"])
def test_a_column_missing_from_the_test_file_names_file_and_column(tiny_bert, files, column):
    train_path, _, _, (_, test, _) = files
    path = _jsonl(
        train_path.parent / "test_lacks.jsonl",
        [{k: v for k, v in r.items() if k != column} for r in test],
    )
    with pytest.raises(DataError, match=rf"^{path}: missing \w+ column '{column}' \(columns: "):
        build_task(_spec(tiny_bert, train_path, test_dataset=str(path)))


def test_the_same_file_cannot_be_training_and_test_data(tiny_bert, files):
    train_path, _, _, _ = files
    (train_path.parent / "x").mkdir()
    same = f"{train_path.parent}/x/../train.jsonl"
    with pytest.raises(DataError, match="task.test_dataset is the same file as task.dataset"):
        build_task(_spec(tiny_bert, train_path, test_dataset=same))


def test_lm_test_and_validation_files(tmp_path):
    train = _jsonl(tmp_path / "plays.jsonl", [{"text": "to be or not to be", "device": "a"}] * 3)
    test = _csv(tmp_path / "held.csv", [{"text": "that is the question", "device": "b"}])
    val = _jsonl(tmp_path / "val.jsonl", [{"text": "whether tis nobler", "label": None}])
    spec = TaskSpec(kind="lm", dataset=str(train), test_dataset=str(test), max_length=8)
    spec.validation_dataset = str(val)
    task = build_task(spec)
    assert len(task.train) == 9  # 3 texts of 18 characters: 8 + 8 + 2 each
    assert "".join(task.decode(r) for r in task.test) == "that is the question"
    assert [r["device"] for r in task.test] == ["b"] * 3
    assert "".join(task.decode(r) for r in task.validation) == "whether tis nobler"


def test_bundled_clinc150_with_a_user_test_file_keeps_its_validation(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [{"text": "wake me at 7", "label": "alarm"}] * 2)
    raw = load_raw("clinc150", test_dataset=str(path))
    assert (len(raw["train"]), len(raw["validation"]), len(raw["test"])) == (15_100, 3_100, 2)
    assert raw["test"].to_dict() == {"text": ["wake me at 7"] * 2, "label": ["alarm"] * 2}


def test_a_hub_id_gives_its_test_or_its_only_split(tmp_path, monkeypatch):
    def split(tag, n):
        return Dataset.from_dict({"text": [f"{tag}{i}" for i in range(n)], "label": ["a"] * n})

    hubs = {
        "me/both": DatasetDict({"train": split("tr", 4), "test": split("te", 2)}),
        "me/only": DatasetDict({"train": split("o", 3)}),
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda name: hubs[name])
    path = _jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "a"}] * 5)
    raw = load_raw(str(path), test_dataset="me/both", validation_dataset="me/only")
    assert raw["test"].to_dict()["text"] == ["te0", "te1"]
    assert raw["validation"].to_dict()["text"] == ["o0", "o1", "o2"]
    with pytest.raises(
        DataError, match=r"^me/both: no 'validation' split .* \(splits: train, test\)"
    ):
        load_raw(str(path), validation_dataset="me/both")
