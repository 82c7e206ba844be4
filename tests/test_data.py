import pytest

from fedtrust.errors import DataError
from fedtrust.tasks import load_raw


def test_bundled_clinc150_has_its_splits_and_151_labels():
    raw = load_raw("clinc150")
    assert (len(raw["train"]), len(raw["test"])) == (15_100, 5_500)
    assert len(set(raw["train"].to_dict()["label"])) == 151


def test_bundled_shakespeare_is_one_device_per_speaker():
    raw = load_raw("shakespeare", need_label=False)
    devices = raw["train"].to_dict()["device"] + raw["test"].to_dict()["device"]
    assert "GLOUCESTER" in devices and len(set(devices)) > 250


def test_user_jsonl_with_custom_columns(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"utt": "hi there", "intent": "greet", "user": "u1"}\n' * 20)
    raw = load_raw(str(path), text_column="utt", label_column="intent", device_column="user")
    assert raw["train"].column_names == ["text", "label", "device"]
    assert len(raw["train"]) + len(raw["test"]) == 20


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_raw(str(path))


def test_csv_with_a_short_row_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nhello,greet\nbye\n")
    with pytest.raises(DataError, match=r"bad.csv:3: 1 fields where the header has 2"):
        load_raw(str(path))


def test_missing_column_and_missing_file(tmp_path):
    path = tmp_path / "nolabel.csv"
    path.write_text("text,other\nhello,1\n")
    with pytest.raises(DataError, match="missing label column 'label'"):
        load_raw(str(path))
    with pytest.raises(DataError, match="data file not found"):
        load_raw(str(tmp_path / "absent.jsonl"))


def test_empty_text_is_rejected_with_its_row(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": " ", "label": "a"}\n')
    with pytest.raises(DataError, match=r"empty.jsonl:2: column 'text' is empty"):
        load_raw(str(path))
