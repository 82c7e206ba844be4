"""Gendered word pairs: strict loading and involutive swapping."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from fedtrust.errors import DataError
from fedtrust.fairness.wordpairs import (
    BUNDLED,
    WordPairError,
    WordPairs,
    load_word_pairs,
)

# uclanlp/gn_glove's lists as published, vendored beside the cleaned ones (see SOURCE.md)
ORIGINAL_MALE = BUNDLED / "original_male_word_file.txt"
ORIGINAL_FEMALE = BUNDLED / "original_female_word_file.txt"


def _write(tmp_path: Path, male: list[str], female: list[str]) -> tuple[Path, Path]:
    (tmp_path / "m.txt").write_text("\n".join(male) + "\n")
    (tmp_path / "f.txt").write_text("\n".join(female) + "\n")
    return tmp_path / "m.txt", tmp_path / "f.txt"


def test_bundled_pairs_are_an_involution() -> None:
    pairs = load_word_pairs()
    mapping = pairs.mapping
    assert len(pairs.pairs) == 191
    assert all(mapping[mapping[word]] == word for word in mapping)
    assert mapping["he"] == "she" and mapping["actress"] == "actor"


def test_swapping_twice_gives_the_text_back() -> None:
    pairs = load_word_pairs()
    texts = [
        "The actor thanked his mother and the King.",
        "MY BROTHER said she is a waitress.",
        "Grandfathers and granddaughters; he'll come.",
    ]
    for text in texts:
        once = pairs.swap(text)
        assert once != text
        assert pairs.swap(once) == text
    assert pairs.swap("The actor thanked his mother.") == "The actress thanked her father."
    assert pairs.swap("HE") == "SHE" and pairs.swap("He") == "She"


def test_one_way_pronouns_keep_sentences_grammatical() -> None:
    pairs = load_word_pairs()
    assert pairs.swap("she called him") == "he called her"
    assert "him" not in pairs.mapping  # not part of the involution


def test_words_inside_other_words_are_left_alone() -> None:
    pairs = load_word_pairs()
    assert pairs.swap("the theme of history") == "the theme of history"


def test_duplicate_word_is_named_with_file_and_line(tmp_path: Path) -> None:
    male, female = _write(tmp_path, ["he", "groom", "bridegroom"], ["she", "bride", "bride"])
    with pytest.raises(WordPairError, match=r"f\.txt:3: 'bride' already appears at .*f\.txt:2"):
        load_word_pairs(male, female)


def test_asymmetric_pair_is_an_error(tmp_path: Path) -> None:
    # "she" maps to "he" but "he" also appears on the female side: not an involution
    male, female = _write(tmp_path, ["he", "she"], ["she", "her"])
    with pytest.raises(WordPairError, match="'she' already appears"):
        load_word_pairs(male, female)
    with pytest.raises(WordPairError, match="paired with itself"):
        WordPairs((("x", "x"),))


def test_unequal_files_and_missing_file(tmp_path: Path) -> None:
    male, female = _write(tmp_path, ["he", "king"], ["she"])
    with pytest.raises(WordPairError, match="line-aligned"):
        load_word_pairs(male, female)
    with pytest.raises(WordPairError, match="not found"):
        load_word_pairs(tmp_path / "nope.txt", female)


def test_original_list_has_duplicates_and_dedupe_makes_the_bundled_pairs() -> None:
    with pytest.raises(WordPairError, match="already appears"):
        load_word_pairs(ORIGINAL_MALE, ORIGINAL_FEMALE)
    male = ORIGINAL_MALE.read_text().lower().split()
    female = ORIGINAL_FEMALE.read_text().lower().split()
    assert len(male) == len(female) == 222
    kept, dropped = dedupe_pairs(zip(male, female))
    assert len(kept) == 191 and len(dropped) == 31
    assert WordPairs(tuple(kept)).pairs == load_word_pairs().pairs  # what SOURCE.md says


def test_word_pair_errors_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_word_pairs(tmp_path / "nope.txt", tmp_path / "nope.txt")


def test_gendered_counts() -> None:
    pairs = load_word_pairs()
    assert pairs.gendered("He and his brother met her.") == {"male": 3, "female": 1}


def dedupe_pairs(pairs: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], list]:
    """Keep the first pair of every word; return (kept, dropped) — how the bundled list was made."""
    kept, dropped, used = [], [], set()
    for male, female in pairs:
        if male in used or female in used or male == female:
            dropped.append((male, female))
            continue
        kept.append((male, female))
        used |= {male, female}
    return kept, dropped
