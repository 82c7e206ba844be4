"""Raw datasets: the bundled ones, a user's JSON-lines/CSV file, or a Hugging Face hub id.

Everything comes back as `datasets.DatasetDict` with a `train` and a `test` split, a `validation`
split when there is one, and the columns `text`, `label` (intent classification only),
optionally `device` and `cohort`; label, device and cohort values become strings.

Where the splits come from (`load_raw`):
- train: the `dataset`'s train split (a file is all training data);
- test: `test_dataset` when given (then the whole `dataset` is training data and `test_fraction`
  is not used), else the dataset's own test split (bundled CLINC150, hub datasets that have
  one), else `test_fraction` of the training rows, held out;
- validation: `validation_dataset` when given, else the dataset's own validation split when it
  brings one (bundled CLINC150, hub datasets); never carved out of train, so a user file alone
  has none.
`test_dataset` and `validation_dataset` are read like `dataset` (same formats, same column
names); a bundled name or hub id gives its `test` (`validation`) split, or its only split.
Every file needs the text column and (with `need_label`) the label column; the device column
when `device_column` names one other than the default "device"; the cohort column the training
data only. A `.json` file is JSON lines, or one array of objects (rows named "item N").

Files are parsed here, not by pyarrow or pandas, so every bad input fails with one line naming
the file, the line and the column: a missing or empty file, a line that is not JSON, a CSV row
with the wrong number of fields, bytes that are not UTF-8, a missing column, a null or empty
text, a text that is not a string, a null label, and (with `need_label`) a test or validation
label never seen in training.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from fedtrust.errors import ConfigError, DataError

DATA_DIR = Path(__file__).parent / "data"
BUNDLED = ("clinc150", "shakespeare")
SPLITS = ("train", "validation", "test")
FILE_TYPES = (".jsonl", ".json", ".csv")
MISSING = object()  # a JSON line without the column at all

# (source name for messages, column names, rows, row index -> "file:line" for messages)
Rows = tuple[str, list[str], list[dict[str, Any]], Callable[[int], str]]


@dataclass(frozen=True)
class Columns:
    """The user's column names for fedtrust's columns ("" = not read), and what is checked."""

    text: str = "text"
    label: str = "label"  # "" = no label (language modelling)
    device: str = "device"
    cohort: str = ""
    device_required: bool = False  # a device column named by the user must be there
    known_labels: frozenset[str] | None = None  # test/validation sources: the training labels
    train_source: str = ""  # named when a label is unknown

    def pairs(self) -> list[tuple[str, str]]:
        """(fedtrust column, user column) for every column read, in output order."""
        named = (("text", self.text), ("label", self.label), ("device", self.device))
        return [(ours, theirs) for ours, theirs in (*named, ("cohort", self.cohort)) if theirs]


def load_raw(
    name: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    device_column: str = "device",
    cohort_column: str = "",
    need_label: bool = True,
    test_fraction: float = 0.1,
    seed: int = 0,
    test_dataset: str = "",
    validation_dataset: str = "",
) -> DatasetDict:
    """Load `name` (+ `test_dataset`, `validation_dataset`) with columns text / label / device.

    Split semantics are in the module docstring. Every bad input raises `DataError` (one line:
    file, line or column, value).
    """
    datasets.disable_progress_bars()
    _check_distinct(name, test_dataset, validation_dataset)
    label = label_column if need_label else ""
    named_device = device_column != "device"  # the default name is optional, a chosen one is not
    columns = Columns(text_column, label, device_column, cohort_column, named_device)
    raw = _load(name, columns)
    if test_dataset:
        raw.pop("test", None)
    elif "test" not in raw:
        raw["train"], raw["test"] = _hold_out(raw["train"], name, test_fraction, seed)
    known = frozenset(raw["train"].unique("label")) if need_label else None
    held = replace(columns, known_labels=known, train_source=name)
    for role, source in (("test", test_dataset), ("validation", validation_dataset)):
        if source:
            raw[role] = _load(source, held, role=role)[role]
    return DatasetDict({split: raw[split] for split in SPLITS if split in raw})


def shakespeare_speeches(path: Path) -> Dataset:
    """One row per speech: the speaker's name is the device, the speech is the text."""
    speakers, texts = [], []
    for block in re.split(r"\n\s*\n", path.read_text()):
        lines = block.strip().split("\n")
        if len(lines) < 2 or not lines[0].endswith(":"):
            continue
        speakers.append(lines[0][:-1].strip())
        texts.append("\n".join(lines[1:]))
    return Dataset.from_dict({"text": texts, "device": speakers})


def _check_distinct(name: str, test: str, validation: str) -> None:
    """Training, test and validation data must not be the same file (it would leak)."""
    keys = {"task.dataset": name, "task.test_dataset": test, "task.validation_dataset": validation}
    seen: dict[Path, str] = {}
    for key, value in keys.items():
        if value and Path(value).suffix in FILE_TYPES:
            path = Path(value).resolve()
            if path in seen:
                raise DataError(f"{value}: {key} is the same file as {seen[path]}")
            seen[path] = key


def _hold_out(train: Dataset, name: str, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if not 0 < fraction < 1:
        raise ConfigError(f"task.test_fraction: must be in (0, 1), got {fraction}")
    n = len(train)
    n_test = math.ceil(fraction * n)  # as datasets counts them
    if n_test < 1 or n - n_test < 1:
        raise DataError(
            f"{name}: {n} rows are too few to hold out task.test_fraction = {fraction} for "
            f"testing (give a test file as task.test_dataset)"
        )
    split = train.train_test_split(test_size=fraction, seed=seed)
    return split["train"], split["test"]


def _load(name: str, columns: Columns, role: str = "") -> dict[str, Dataset]:
    """Every split of `name` (only the one for `role`, "test" or "validation", when given)."""
    splits = _open(name)
    if role:
        if role not in splits and len(splits) > 1:
            raise DataError(
                f"{name}: no {role!r} split to use as task.{role}_dataset "
                f"(splits: {', '.join(splits)})"
            )
        splits = {role: splits.get(role) or next(iter(splits.values()))}
    out = {}
    for split, read in splits.items():
        # the cohort is a per-device attribute of the training data: required there only
        need = columns if split == "train" and not role else replace(columns, cohort="")
        out[split] = _table(*read(), need, optional_cohort=columns.cohort)
    return out


def _open(name: str) -> dict[str, Callable[[], Rows]]:
    """A reader per split of `name`; files are read (and checked) only when their split is."""
    if name == "clinc150":
        return {s: partial(_read_file, DATA_DIR / "clinc150" / f"{s}.jsonl") for s in SPLITS}
    if name == "shakespeare":
        path = DATA_DIR / "shakespeare" / "tinyshakespeare.txt"
        return {"train": lambda: _dataset_rows(name, "train", shakespeare_speeches(path))}
    path = Path(name)
    if path.suffix in FILE_TYPES:
        return {"train": partial(_read_file, path)}
    if path.exists():
        raise DataError(f"{name}: unsupported data file type (use .jsonl, .json or .csv)")
    return {split: partial(_dataset_rows, name, split, ds) for split, ds in _load_hub(name).items()}


def _load_hub(name: str) -> dict[str, Dataset]:
    try:
        raw = datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the name is what matters
        raise DataError(
            f"{name}: not a bundled dataset ({', '.join(BUNDLED)}), not a .jsonl/.csv file, and "
            f"not loadable from the Hugging Face hub ({type(err).__name__})"
        ) from None
    splits = {"train": raw["train"]} if "train" in raw else {"train": next(iter(raw.values()))}
    for split in ("validation", "test"):
        if split in raw:
            splits[split] = raw[split]
    return splits


def _dataset_rows(name: str, split: str, ds: Dataset) -> Rows:
    data = ds.to_dict()
    rows = [dict(zip(data, values)) for values in zip(*data.values())]
    return name, list(ds.column_names), rows, lambda i: f"{name}: {split} row {i + 1}"


def _table(
    source: str,
    keys: list[str],
    rows: list[dict[str, Any]],
    locate: Callable[[int], str],
    columns: Columns,
    optional_cohort: str = "",
) -> Dataset:
    """The checked, renamed columns of `rows` as a Dataset (strings only)."""
    for ours, theirs in columns.pairs():
        if theirs not in keys and (ours != "device" or columns.device_required):
            raise DataError(
                f"{source}: missing {ours} column {theirs!r} (columns: {', '.join(keys)}; "
                f"task.{ours}_column names it)"
            )
    pairs = [(ours, theirs) for ours, theirs in columns.pairs() if theirs in keys]
    if optional_cohort and optional_cohort in keys and not columns.cohort:
        pairs.append(("cohort", optional_cohort))
    out: dict[str, list[str]] = {ours: [] for ours, _ in pairs}
    for i, row in enumerate(rows):
        for ours, theirs in pairs:
            out[ours].append(_value(row.get(theirs, MISSING), ours, theirs, locate, i, columns))
    return Dataset.from_dict(out)


def _value(
    value: Any, ours: str, theirs: str, locate: Callable[[int], str], i: int, columns: Columns
) -> str:
    """One cell as a string, or a DataError naming the file, line, column and value."""
    if value is MISSING or value is None or (isinstance(value, float) and math.isnan(value)):
        state = "missing" if value is MISSING else "null"
        raise DataError(f"{locate(i)}: column {theirs!r} is {state} (every row needs a {ours})")
    if ours == "text" and not isinstance(value, str):
        raise DataError(
            f"{locate(i)}: column {theirs!r} must be a string, got {_show(value)} "
            f"({type(value).__name__})"
        )
    if not isinstance(value, str | int | float):
        raise DataError(
            f"{locate(i)}: column {theirs!r} must be a string or a number, got {_show(value)} "
            f"({type(value).__name__})"
        )
    text = str(value)
    if not text.strip():
        raise DataError(f"{locate(i)}: column {theirs!r} is empty ({_show(value)})")
    known = columns.known_labels
    if ours == "label" and known is not None and text not in known:
        raise DataError(
            f"{locate(i)}: label {text!r} never seen in training ({columns.train_source} has "
            f"{len(known)} labels; intent classification cannot score a new one)"
        )
    return text


def _show(value: Any, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _read_file(path: Path) -> Rows:
    text = _read_text(path)
    if path.suffix == ".csv":
        keys, rows, lines = _parse_csv(path, text)
    elif path.suffix == ".json" and text.lstrip().startswith("["):
        keys, rows, lines = _parse_json_array(path, text)
    else:
        keys, rows, lines = _parse_jsonl(path, text)
    if not rows:
        raise DataError(f"{path}: no data rows ({'only a header' if keys else 'an empty array'})")
    return str(path), keys, rows, lambda i: f"{path}:{lines[i]}"


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 (a byte-order mark is dropped), never empty."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror})") from None
    if not data.strip():
        raise DataError(f"{path}: empty file ({len(data)} bytes, no rows)")
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = start + err.start
        line, line_start = data.count(b"\n", 0, at) + 1, data.rfind(b"\n", 0, at) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[at]:02x} at byte {at - line_start + 1} of "
            f"the line, offset {at} of the file); save it as UTF-8"
        ) from None


def _parse_jsonl(path: Path, text: str) -> tuple[list[str], list[dict], list[Any]]:
    keys: dict[str, None] = {}
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}): "
                f"{_show(line.strip())}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{number}: expected a JSON object per line, got {_show(line.strip())}"
            )
        keys.update(dict.fromkeys(row))
        rows.append(row)
        lines.append(number)
    return list(keys), rows, lines


def _parse_json_array(path: Path, text: str) -> tuple[list[str], list[dict], list[Any]]:
    """A .json file holding one array of objects: rows are named by item number."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    keys: dict[str, None] = {}
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {number} of the array is not an object: {_show(item)}")
        keys.update(dict.fromkeys(item))
    return list(keys), items, [f" item {n}" for n in range(1, len(items) + 1)]


def _parse_csv(path: Path, text: str) -> tuple[list[str], list[dict], list[Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows, lines = [], []
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not record:
                continue
            if header is None:
                header = record
                for column in header:
                    if header.count(column) > 1:
                        raise DataError(f"{path}:{line}: column {column!r} appears twice")
                continue
            if len(record) != len(header):
                raise DataError(
                    f"{path}:{line}: {len(record)} fields where the header has {len(header)}: "
                    f"{_show(','.join(record))}"
                )
            rows.append(dict(zip(header, record)))
            lines.append(line)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    return header or [], rows, lines
