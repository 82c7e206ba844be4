"""Fairness fixtures: a toy EEC-like set, a PSM and two classifiers of known bias (tiny BERT)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedtrust.fairness.psm import fine_tune, train_psm
from fedtrust.fairness.wordpairs import load_word_pairs
from fedtrust.tasks.base import freeze_lower
from fedtrust.tasks.models import quiet_transformers

MALE = ["he", "my brother", "this man", "my father", "my son", "my uncle"]
FEMALE = ["she", "my sister", "this woman", "my mother", "my daughter", "my aunt"]
JOY = ["happy", "glad", "excited", "delighted", "cheerful"]
SAD = ["sad", "miserable", "gloomy", "depressed", "upset"]
TEMPLATES = ["{s} feels {e}.", "{s} is {e} today.", "{s} seems {e} now."]
STEPS = 120


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones."""
    with torch_threads(1):
        yield


def toy_texts() -> tuple[list[str], list[int], list[int]]:
    """Every template x person x emotion word: texts, gender (1 = female), emotion (1 = joy).
    The set is its own counterfactual augmentation: every sentence's gender swap is in it."""
    texts, gender, joy = [], [], []
    people = [(0, MALE), (1, FEMALE)]
    for template, (g, persons), (y, words) in itertools.product(
        TEMPLATES, people, [(1, JOY), (0, SAD)]
    ):
        for person, word in itertools.product(persons, words):
            text = template.format(s=person, e=word)
            texts.append(text[0].upper() + text[1:])
            gender.append(g)
            joy.append(y)
    return texts, gender, joy


def _classifier(folder: Path, labels: list[int], texts: list[str], tokenizer: Any, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    # embeddings frozen: every model shares the tiny BERT's embeddings
    freeze_lower(model, embeddings=True, layers=0)
    fine_tune(model, tokenizer, texts, labels, STEPS, 32, lr=1e-3, head_lr=1e-3, seed=seed)
    return model


@pytest.fixture(scope="session")
def toy(tiny_bert: Path) -> dict[str, Any]:
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts, gender, joy = toy_texts()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    with torch_threads(1):  # a session fixture is set up before the module's one_thread
        psm, _ = train_psm(base, tokenizer, texts, gender, STEPS, lr=1e-3, head_lr=1e-3)
        biased = _classifier(tiny_bert, gender, texts, tokenizer)
        fair = _classifier(tiny_bert, joy, texts, tokenizer)
    return {
        "tokenizer": tokenizer,
        "texts": texts,
        "gender": gender,
        "joy": joy,
        "swapped": [load_word_pairs().swap(t) for t in texts],
        "psm": psm,
        # known bias: the label is the gendered word (female -> 1), whatever the emotion
        "biased": biased,
        # trained on the counterfactually augmented set: the label is the emotion word
        "fair": fair,
    }
