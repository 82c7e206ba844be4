"""Gendered word pairs and counterfactual swapping (he <-> she, actor <-> actress, ...).

The pair list must define an involution: every word belongs to exactly one pair, so swapping twice
gives the original text back. `load_word_pairs` checks that and names the file and lines of every
duplicate. The bundled list (`fairness/data/gender_pairs/`, from uclanlp/gn_glove) was cleaned of
its duplicates once, keeping the first pair of each word (see its SOURCE.md).

Pronouns are ambiguous (her = his or him; his = her or hers): the involutive pair is his <-> her,
and text swapping adds the one-way mappings him -> her and hers -> his so that a swapped sentence
stays grammatical. Those extras are the only non-involutive part, kept out of the pair list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fedtrust.errors import DataError

BUNDLED = Path(__file__).parent / "data" / "gender_pairs"
ONE_WAY = {"him": "her", "hers": "his"}


class WordPairError(DataError):
    """A word-pair file is malformed: duplicates, a word on both sides, or unequal lengths."""


@dataclass(frozen=True)
class WordPairs:
    """Male/female word pairs; `swap` maps each word to its counterpart (an involution)."""

    pairs: tuple[tuple[str, str], ...]
    one_way: dict[str, str] = field(default_factory=lambda: dict(ONE_WAY))

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, (male, female) in enumerate(self.pairs):
            if male == female:
                raise WordPairError(f"pair {i + 1}: {male!r} is paired with itself")
            for word in (male, female):
                if word in seen:
                    raise WordPairError(
                        f"{word!r} appears in pairs {seen[word] + 1} and {i + 1}: swapping would "
                        "not be an involution; keep one pair per word"
                    )
                seen[word] = i

    @property
    def male(self) -> list[str]:
        return [m for m, _ in self.pairs]

    @property
    def female(self) -> list[str]:
        return [f for _, f in self.pairs]

    @property
    def mapping(self) -> dict[str, str]:
        """word -> counterpart, both directions (the involution)."""
        out = {m: f for m, f in self.pairs}
        out.update({f: m for m, f in self.pairs})
        return out

    def swap(self, text: str) -> str:
        """The counterfactual text: every gendered word replaced by its counterpart, case kept."""
        table = {k.lower().replace("_", " "): v.replace("_", " ") for k, v in self.mapping.items()}
        for word, other in self.one_way.items():
            table.setdefault(word, other)
        return _pattern(tuple(sorted(table, key=len, reverse=True))).sub(
            lambda m: _same_case(m.group(0), table[m.group(0).lower()]), text
        )

    def gendered(self, text: str) -> dict[str, int]:
        """How many male and female words a text contains (for gender polarity of generations)."""
        male = {w.lower() for w in self.male} | {"him"}
        female = {w.lower() for w in self.female} | {"hers"}
        counts = {"male": 0, "female": 0}
        for token in re.findall(r"[A-Za-z_']+", text.lower()):
            counts["male"] += token in male
            counts["female"] += token in female
        return counts


def load_word_pairs(
    male_file: Path | str = BUNDLED / "male_word_file.txt",
    female_file: Path | str = BUNDLED / "female_word_file.txt",
) -> WordPairs:
    """Read line-aligned pair files (line i of one pairs with line i of the other); strict."""
    male_lines = _lines(Path(male_file))
    female_lines = _lines(Path(female_file))
    if len(male_lines) != len(female_lines):
        raise WordPairError(
            f"{male_file} has {len(male_lines)} words but {female_file} has {len(female_lines)}: "
            "pair files must be line-aligned"
        )
    first: dict[str, tuple[Path, int]] = {}
    for (m_no, male), (f_no, female) in zip(male_lines, female_lines):
        for path, no, word in ((Path(male_file), m_no, male), (Path(female_file), f_no, female)):
            if word in first:
                p0, n0 = first[word]
                raise WordPairError(
                    f"{path}:{no}: {word!r} already appears at {p0}:{n0} (duplicate or asymmetric "
                    "pair: every word must belong to exactly one pair)"
                )
            first[word] = (path, no)
    return WordPairs(tuple((m, f) for (_, m), (_, f) in zip(male_lines, female_lines)))


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise WordPairError(f"{path}: word-pair file not found")
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        word = line.strip().lower()
        if not word:
            continue
        if " " in word:
            raise WordPairError(f"{path}:{no}: {line!r} has a space (write phrases with '_')")
        out.append((no, word))
    return out


_PATTERNS: dict[tuple[str, ...], re.Pattern] = {}


def _pattern(words: tuple[str, ...]) -> re.Pattern:
    if words not in _PATTERNS:
        alternatives = "|".join(re.escape(w) for w in words)
        _PATTERNS[words] = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    return _PATTERNS[words]


def _same_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement
