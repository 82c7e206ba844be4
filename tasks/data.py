"""Raw datasets: the bundled ones, a user's JSON-lines/CSV file, or a Hugging Face hub id.

Everything comes back as `datasets.DatasetDict` with a `train` and a `test` split, a `validation`
split when the data brings one (bundled CLINC150, hub datasets that have it; never carved out of
train), and the columns `text`, optionally `label` and `device`. Bad files fail here with the
file, line and field named.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from fedtrust.errors import DataError

DATA_DIR = Path(__file__).parent / "data"
BUNDLED = ("clinc150", "shakespeare")
SPLITS = ("train", "validation", "test")


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
) -> DatasetDict:
    """Load `name` and normalise its columns to text / label / device (splits: `SPLITS`)."""
    datasets.disable_progress_bars()
    if name == "clinc150":
        folder = DATA_DIR / "clinc150"
        files = {split: str(folder / f"{split}.jsonl") for split in SPLITS}
        raw = datasets.load_dataset("json", data_files=files)
    elif name == "shakespeare":
        raw = DatasetDict(
            {"train": shakespeare_speeches(DATA_DIR / "shakespeare" / "tinyshakespeare.txt")}
        )
    elif Path(name).suffix in (".jsonl", ".json", ".csv"):
        raw = DatasetDict({"train": _load_file(Path(name))})
    elif Path(name).exists():
        raise DataError(f"{name}: unsupported data file type (use .jsonl, .json or .csv)")
    else:
        raw = _load_hub(name)

    raw = _rename(raw, name, text_column, label_column, device_column, cohort_column, need_label)
    if "test" not in raw:
        split = raw["train"].train_test_split(test_size=test_fraction, seed=seed)
        raw = DatasetDict({**raw, "train": split["train"], "test": split["test"]})
    return raw


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


def _load_file(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix == ".csv":
        _check_csv(path)
        return datasets.load_dataset("csv", data_files=str(path), split="train")
    _check_jsonl(path)
    return datasets.load_dataset("json", data_files=str(path), split="train")


def _check_jsonl(path: Path) -> None:
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line")


def _check_csv(path: Path) -> None:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty CSV file (expected a header line)")
        for number, row in enumerate(reader, start=2):
            if row and len(row) != len(header):
                raise DataError(
                    f"{path}:{number}: {len(row)} fields where the header has {len(header)}"
                )


def _load_hub(name: str) -> DatasetDict:
    try:
        raw = datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the name is what matters
        raise DataError(
            f"{name}: not a bundled dataset ({', '.join(BUNDLED)}), not a .jsonl/.csv file, and "
            f"not loadable from the Hugging Face hub ({type(err).__name__})"
        ) from None
    splits = {"train": raw["train"]} if "train" in raw else {"train": next(iter(raw.values()))}
    for name in ("validation", "test"):
        if name in raw:
            splits[name] = raw[name]
    return DatasetDict(splits)


def _rename(
    raw: DatasetDict,
    name: str,
    text: str,
    label: str,
    device: str,
    cohort: str,
    need_label: bool,
) -> DatasetDict:
    columns = raw["train"].column_names
    if cohort and cohort not in columns:
        raise DataError(f"{name}: missing cohort column {cohort!r} (columns: {', '.join(columns)})")
    if text not in columns:
        raise DataError(f"{name}: missing text column {text!r} (columns: {', '.join(columns)})")
    if need_label and label not in columns:
        raise DataError(f"{name}: missing label column {label!r} (columns: {', '.join(columns)})")
    mapping = {text: "text", label: "label", device: "device", cohort: "cohort"}
    keep = [c for c in (text, label, device, cohort) if c and c in columns]
    out = {}
    for split, ds in raw.items():
        ds = ds.select_columns([c for c in keep if c in ds.column_names])
        ds = ds.rename_columns({c: mapping[c] for c in ds.column_names if mapping[c] != c})
        _check_no_missing(ds, name, split)
        out[split] = ds
    return DatasetDict(out)


def _check_no_missing(ds: Dataset, name: str, split: str) -> None:
    for column, values in ds.to_dict().items():
        for i, value in enumerate(values):
            if value is None or (column == "text" and not str(value).strip()):
                raise DataError(f"{name}: {split} row {i + 1} has an empty {column!r}")
