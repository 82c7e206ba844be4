"""Every bad data file fails with one line naming the file, the line or column, and the value.

Each case runs through the public entry point `build_task` twice: as the training data
(`task.dataset`) and as the test data (`task.test_dataset`, next to a good training file).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from fedtrust.errors import DataError
from fedtrust.tasks import TaskSpec, build_task

ROLES = ["dataset", "test_dataset"]
GOOD = [  # a good training file's rows: every column a case may name
    {"text": f"hi {i}", "utt": f"hi {i}", "label": "ab"[i % 2], "user": f"u{i}", "region": "r"}
    for i in range(6)
]


def _lines(*rows: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def _build(tmp_path: Path, role: str, path: Path, **extra) -> None:
    if role == "dataset":
        spec = TaskSpec(dataset=str(path), **extra)
    else:
        train = tmp_path / "good_train.jsonl"
        train.write_bytes(_lines(*GOOD))
        spec = TaskSpec(dataset=str(train), test_dataset=str(path), **extra)
    build_task(spec, seed=0)


def _refused(tmp_path: Path, role: str, name: str, content: bytes | None, **extra) -> str:
    """The message of the DataError that building a task on this file raises, checked to be
    one line, starting with the file's path, with no library exception attached."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        _build(tmp_path, role, path, **extra)
    err = caught.value
    message = str(err)
    assert type(err) is DataError
    assert "\n" not in message and message.startswith(str(path))
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return message[len(str(path)) :]


def _check(rest: str, expected: str) -> None:
    assert re.fullmatch(expected, rest), f"{rest!r} does not match {expected!r}"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", ["absent.jsonl", "absent.csv", "absent.json"])
def test_a_missing_file(tmp_path, role, name):
    _check(_refused(tmp_path, role, name, None), r": data file not found")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("zero.jsonl", b"", r": empty file \(0 bytes, no rows\)"),
        ("zero.csv", b"", r": empty file \(0 bytes, no rows\)"),
        ("zero.json", b"", r": empty file \(0 bytes, no rows\)"),
        ("blank.jsonl", b"\n  \n\n", r": empty file \(5 bytes, no rows\)"),
        ("header.csv", b"text,label\n", r": no data rows \(only a header\)"),
        ("header_blank.csv", b"text,label\n\n\n", r": no data rows \(only a header\)"),
        ("array.json", b"[ ]\n", r": no data rows \(an empty array\)"),
    ],
)
def test_an_empty_file(tmp_path, role, name, content, expected):
    _check(_refused(tmp_path, role, name, content), expected)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "cut.jsonl",
            _lines(GOOD[0], GOOD[1], '{"text": "b", "label": '),
            r":3: not valid JSON \(Expecting value at column 24\): '\{\"text\": \"b\", \"label\":'",
        ),
        ("blank_then_bad.jsonl", _lines(GOOD[0], "", "{text: 1}"), r":3: not valid JSON .*"),
        (
            "list.jsonl",
            _lines(GOOD[0], "[1, 2]"),
            r":2: expected a JSON object per line, got '\[1, 2\]'",
        ),
        (
            "string.jsonl",
            _lines(GOOD[0], '"hi"'),
            r":2: expected a JSON object per line, got .*hi.*",
        ),
        (
            "cut.json",
            b'[\n  {"text": "a", "label": "a"},\n  {"text": }\n]',
            r":3:12: not valid JSON .*",
        ),
        (
            "items.json",
            b'[{"text": "a", "label": "a"}, 7]',
            r": item 2 of the array is not an object: 7",
        ),
    ],
)
def test_malformed_json(tmp_path, role, name, content, expected):
    _check(_refused(tmp_path, role, name, content), expected)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"text,label\nhello,a\nbye\n", r":3: 1 fields where the header has 2: 'bye'"),
        (
            b"text,label\nhello,a\n\nx,a,extra\n",
            r":4: 3 fields where the header has 2: 'x,a,extra'",
        ),
        # a quoted field spanning two lines: the next record starts on line 4
        (b'text,label\n"two\nlines",a\nbad\n', r":4: 1 fields where the header has 2: 'bad'"),
        (b'text,label\nhello,a\n"open,a\n', r":3: not valid CSV \(unexpected end of data\)"),
        (b"text,label,text\nhello,a,b\n", r":1: column 'text' appears twice"),
    ],
)
def test_malformed_csv(tmp_path, role, content, expected):
    _check(_refused(tmp_path, role, "bad.csv", content), expected)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "latin1.jsonl",
            _lines(GOOD[0]) + '{"text": "café", "label": "a"}\n'.encode("latin-1"),
            r":2: not UTF-8 \(byte 0xe9 at byte 14 of the line, offset \d+ of the file\); .*",
        ),
        (
            "latin1.csv",
            "text,label\nhello,a\nnaïve,b\n".encode("latin-1"),
            r":3: not UTF-8 \(byte 0xef at byte 3 of the line, offset 21 of the file\); .*",
        ),
        (
            "cp1252.csv",
            b"text,label\n\x93quoted\x94,a\n",
            r":2: not UTF-8 \(byte 0x93 at byte 1 .*",
        ),
    ],
)
def test_wrong_encoding(tmp_path, role, name, content, expected):
    _check(_refused(tmp_path, role, name, content), expected)


def test_a_utf8_byte_order_mark_is_not_an_encoding_error(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\n" + "café,a\n".encode() * 10)
    task = build_task(TaskSpec(dataset=str(path)), seed=0)
    assert len(task.train) + len(task.test) == 10


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("columns", "extra", "expected"),
    [
        (
            ("label",),
            {},
            r": missing text column 'text' \(columns: label; task.text_column names it\)",
        ),
        (("text",), {}, r": missing label column 'label' \(columns: text; .*"),
        (("text", "label"), {"text_column": "utt"}, r": missing text column 'utt' \(.*"),
        (("text", "label"), {"device_column": "user"}, r": missing device column 'user' \(.*"),
    ],
)
def test_a_missing_column(tmp_path, role, columns, extra, expected):
    rows = [{c: r[c] for c in columns} for r in GOOD]
    for suffix, content in (("jsonl", _lines(*rows)), ("csv", _csv_bytes(rows))):
        _check(_refused(tmp_path, role, f"cols.{suffix}", content, **extra), expected)


def test_a_missing_cohort_column_is_refused_in_the_training_data_only(tmp_path):
    path = tmp_path / "nocohort.jsonl"
    path.write_bytes(_lines(*[{"text": r["text"], "label": r["label"]} for r in GOOD]))
    with pytest.raises(DataError, match=rf"^{path}: missing cohort column 'region' \("):
        _build(tmp_path, "dataset", path, cohort_column="region")
    # a test file need not carry the per-device attribute
    _build(tmp_path, "test_dataset", path, cohort_column="region")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("name", "bad", "expected"),
    [
        ("null_text.jsonl", '{"text": null, "label": "a"}', r":3: column 'text' is null .*"),
        ("no_text.jsonl", '{"label": "a"}', r":3: column 'text' is missing .*"),
        (
            "blank_text.jsonl",
            '{"text": "  ", "label": "a"}',
            r":3: column 'text' is empty \('  '\)",
        ),
        (
            "int_text.jsonl",
            '{"text": 5, "label": "a"}',
            r":3: column 'text' must be a string, got 5 \(int\)",
        ),
        ("list_text.jsonl", '{"text": ["a"], "label": "a"}', r":3: .* got \['a'\] \(list\)"),
        ("null_label.jsonl", '{"text": "x", "label": null}', r":3: column 'label' is null .*"),
        ("nan_label.jsonl", '{"text": "x", "label": NaN}', r":3: column 'label' is null .*"),
        ("dict_label.jsonl", '{"text": "x", "label": {"a": 1}}', r":3: column 'label' must be .*"),
        ("empty_text.csv", ",a", r":4: column 'text' is empty \(''\)"),
        ("empty_label.csv", "x,", r":4: column 'label' is empty \(''\)"),
    ],
)
def test_a_bad_value(tmp_path, role, name, bad, expected):
    if name.endswith(".csv"):
        content = f"text,label\nhello,a\nworld,b\n{bad}\n".encode()
    else:
        content = _lines(GOOD[0], GOOD[1], bad)
    _check(_refused(tmp_path, role, name, content), expected)


@pytest.mark.parametrize("role", ROLES)
def test_a_null_device_names_its_line(tmp_path, role):
    content = _lines(GOOD[0], {"text": "x", "label": "a", "user": None})
    _check(
        _refused(tmp_path, role, "dev.jsonl", content, device_column="user"),
        r":2: column 'user' is null \(every row needs a device\)",
    )


def test_too_few_rows_to_hold_out_a_test_split(tmp_path):
    message = _refused(tmp_path, "dataset", "one.jsonl", _lines(GOOD[0]))
    _check(message, r": 1 rows are too few to hold out task.test_fraction = 0.1 .*test_dataset\)")


def test_an_unknown_hub_id_as_test_data(tmp_path, monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"^nobody/nothing: not a bundled dataset .*ConnectionError"
    ):
        _build(tmp_path, "test_dataset", Path("nobody/nothing"))


def test_an_unsupported_file_type(tmp_path):
    _check(_refused(tmp_path, "test_dataset", "notes.txt", b"hi\n"), r": unsupported data file .*")


def _csv_bytes(rows: list[dict]) -> bytes:
    header = list(rows[0])
    return (
        "\n".join([",".join(header)] + [",".join(r[c] for c in header) for r in rows]) + "\n"
    ).encode()
