"""The Equity Evaluation Corpus (EEC): loading, counterfactual pairs and group columns.

Every EEC sentence fills a template with a person (a name, a noun phrase or a pronoun) and,
for the emotional templates, an emotion word. A sentence's counterfactual keeps the template and
the emotion word and puts in the person's counterpart of the other gender: "my brother" <-> "my
sister", "he" <-> "she", "him" <-> "her", and for names the i-th male name of a race <-> the i-th
female name of the same race (in order of first appearance in the file). Noun phrases and
pronouns are paired with the gendered word pairs (`fedtrust.fairness.wordpairs`) where those know
them; what is left is paired by race and order, which is how "him" finds "her".

Free text has no template: `swap_texts` uses the word-pair swap instead (names stay as they are).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtrust.errors import DataError

from .wordpairs import WordPairs, load_word_pairs

BUNDLED_EEC = Path(__file__).parent / "data" / "eec" / "Equity-Evaluation-Corpus.csv"
COLUMNS = ("ID", "Sentence", "Template", "Person", "Gender", "Race", "Emotion", "Emotion word")
GENDERS = ("male", "female")
EMOTIONS = ("anger", "sadness", "fear", "joy", "")
# the groups every EEC audit must cover (an empty one is an error naming it)
REQUIRED_GROUPS = {"gender": ["male", "female"], "race": ["African-American", "European"]}


class EECError(DataError):
    """The EEC file is missing, lacks a column, or has a bad value (the message names the line)."""


@dataclass(frozen=True)
class EECSentence:
    """One EEC row; `line` is its line number in the CSV file (for error messages)."""

    id: str
    sentence: str
    template: str
    person: str
    gender: str
    race: str
    emotion: str
    emotion_word: str
    line: int


def load_eec(path: Path | str = BUNDLED_EEC) -> list[EECSentence]:
    """Read an EEC-format CSV strictly: every bad row is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EECError(f"{path}: EEC file not found")
    rows: list[EECSentence] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise EECError(f"{path}: empty file")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise EECError(f"{path}:1: missing column(s) {missing} (has {header})")
        index = {c: header.index(c) for c in COLUMNS}
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise EECError(f"{path}:{line}: {len(values)} fields, expected {len(header)}")
            get = {c: values[i].strip() for c, i in index.items()}
            if get["Gender"] not in GENDERS:
                raise EECError(f"{path}:{line}: Gender {get['Gender']!r} is not male or female")
            if get["Emotion"] not in EMOTIONS:
                raise EECError(f"{path}:{line}: unknown Emotion {get['Emotion']!r}")
            if not get["Sentence"] or not get["Person"] or not get["Template"]:
                raise EECError(f"{path}:{line}: empty Sentence, Person or Template")
            rows.append(
                EECSentence(
                    id=get["ID"],
                    sentence=get["Sentence"],
                    template=get["Template"],
                    person=get["Person"],
                    gender=get["Gender"],
                    race=get["Race"],
                    emotion=get["Emotion"],
                    emotion_word=get["Emotion word"],
                    line=line,
                )
            )
    if not rows:
        raise EECError(f"{path}: no sentences")
    return rows


def person_pairs(rows: Sequence[EECSentence], pairs: WordPairs | None = None) -> dict[str, str]:
    """Person -> counterpart of the other gender (symmetric); persons without one are left out."""
    pairs = pairs or load_word_pairs()
    gender: dict[str, str] = {}
    race: dict[str, str] = {}
    for row in rows:  # dicts keep the order of first appearance
        gender.setdefault(row.person, row.gender)
        race.setdefault(row.person, row.race)
    out: dict[str, str] = {}
    for person, g in gender.items():
        other = pairs.swap(person)
        if other != person and gender.get(other) not in (None, g) and other not in out:
            out[person], out[other] = other, person
    left: dict[tuple[str, str], list[str]] = defaultdict(list)
    for person, g in gender.items():
        if person not in out:
            left[(race[person], g)].append(person)
    for (r, g), persons in left.items():
        if g != "male":
            continue
        for male, female in zip(persons, left.get((r, "female"), [])):
            out[male], out[female] = female, male
    return out


def counterparts(rows: Sequence[EECSentence]) -> list[int | None]:
    """For each row, the index of its counterfactual row (same template and emotion word,
    the counterpart person), or None where the file has no such row."""
    mate = person_pairs(rows)
    where = {(r.template, r.emotion_word, r.person): i for i, r in enumerate(rows)}
    return [where.get((r.template, r.emotion_word, mate.get(r.person, ""))) for r in rows]


def counterfactual_pairs(rows: Sequence[EECSentence]) -> list[tuple[EECSentence, EECSentence]]:
    """(male, female) sentence pairs that differ only in the person; each pair once."""
    out = []
    for i, j in enumerate(counterparts(rows)):
        if j is not None and rows[i].gender == "male":
            out.append((rows[i], rows[j]))
    if not out:
        raise EECError("no counterfactual pairs: no template has both genders of a person pair")
    return out


def swap_texts(texts: Sequence[str], pairs: WordPairs | None = None) -> list[str]:
    """Counterfactual free text: every gendered word swapped (he <-> she, actor <-> actress...)."""
    pairs = pairs or load_word_pairs()
    return [pairs.swap(t) for t in texts]


def group_columns(rows: Sequence[EECSentence]) -> dict[str, list[str]]:
    """Protected-group columns for `sensitivity.accumulated`: gender and race ("" = no race)."""
    return {"gender": [r.gender for r in rows], "race": [r.race for r in rows]}
