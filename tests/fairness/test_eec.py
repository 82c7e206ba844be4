"""The EEC loader: strict parsing, and pairs that are real counterfactuals."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from fedtrust.fairness.eec import (
    EECError,
    counterfactual_pairs,
    counterparts,
    group_columns,
    load_eec,
    person_pairs,
    swap_texts,
)

HEADER = "ID,Sentence,Template,Person,Gender,Race,Emotion,Emotion word\n"


@pytest.fixture(scope="module")
def rows():
    return load_eec()


def test_bundled_eec_loads(rows):
    assert len(rows) == 8640
    assert Counter(r.gender for r in rows) == {"male": 4320, "female": 4320}
    columns = group_columns(rows)
    assert set(columns["race"]) == {"African-American", "European", ""}
    assert rows[0].line == 2


def test_pairs_are_real_counterfactuals(rows):
    pairs = counterfactual_pairs(rows)
    assert len(pairs) == 4320  # every sentence in exactly one pair
    assert len({id(r) for pair in pairs for r in pair}) == 8640
    for male, female in pairs:
        assert male.gender == "male" and female.gender == "female"
        assert male.template == female.template
        assert male.emotion_word == female.emotion_word and male.emotion == female.emotion
        assert male.race == female.race
        assert male.person != female.person and male.sentence != female.sentence
        assert _blank(male) == _blank(female)  # they differ only in the person (and -self)


def _blank(row) -> str:
    text = re.sub(rf"\b{re.escape(row.person)}\b", "<P>", row.sentence, count=1, flags=re.I)
    return re.sub(r"\b(him|her)self\b", "<self>", text)


def test_person_counterparts(rows):
    mate = person_pairs(rows)
    assert mate["my brother"] == "my sister" and mate["he"] == "she" and mate["him"] == "her"
    assert all(mate[mate[p]] == p for p in mate)  # an involution
    assert len(mate) == 62  # all 31 male persons have a female counterpart
    index = counterparts(rows)
    assert all(index[index[i]] == i for i in range(len(rows)))


def test_swap_free_text():
    assert swap_texts(["He told his sister.", "My mom feels sad."]) == [
        "She told her brother.",
        "My dad feels sad.",
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ("1,A is sad.,<p> is sad.,A,man,,sadness,sad\n", ":2: Gender 'man' is not male or female"),
        ("1,A is sad.,<p> is sad.,A,male,,grief,sad\n", ":2: unknown Emotion 'grief'"),
        ("1,A is sad.,<p> is sad.,A,male,,sadness\n", ":2: 7 fields, expected 8"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, body, message):
    path = tmp_path / "eec.csv"
    path.write_text(HEADER + body)
    with pytest.raises(EECError, match=f"eec.csv{message}"):
        load_eec(path)


def test_missing_file_and_column(tmp_path):
    with pytest.raises(EECError, match="nope.csv: EEC file not found"):
        load_eec(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("ID,Sentence\n1,x\n")
    with pytest.raises(EECError, match=r"bad.csv:1: missing column\(s\)"):
        load_eec(tmp_path / "bad.csv")
