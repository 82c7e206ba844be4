"""Shown working: a classifier trained on gender-skewed data scores worse than one trained on
counterfactually augmented data, on both accumulated prediction sensitivity and the
counterfactual gap.

Task: EEC emotional sentences, joy (1) vs not joy (0; anger, sadness and fear in equal parts).
Counterfactual units are EEC (male, female) pairs that share template and emotion word; a random
`test_fraction` of them is held out. The *biased* training set takes one sentence per training
unit: the female one with probability `correlation` for joy, the male one with probability
`correlation` otherwise, so gender predicts the label. The *augmented* set adds every chosen
sentence's counterpart, so gender predicts nothing. Both classifiers start from the same
encoder (embeddings and the lowest layers frozen) and train for the same number of steps. One
PSM (the same encoder, a gender head trained on the training units) audits both, on held-out
sentences of both genders. The run itself (models, training, the audit) is
`fedtrust.simulations.fairness_runs.run_bias_demo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtrust.errors import FairnessError

from .eec import EECSentence, counterfactual_pairs
from .psm import gender_data


@dataclass
class DemoData:
    """Training sets (texts, labels) and the held-out rows with their counterparts."""

    biased: tuple[list[str], list[int]]
    augmented: tuple[list[str], list[int]]
    psm: tuple[list[str], list[int]]
    test: list[EECSentence]
    test_counterparts: list[EECSentence]
    female: set[str]  # the training sentences whose person is female

    def stats(self) -> dict[str, Any]:
        """How strongly gender predicts the label in each training set."""
        out: dict[str, Any] = {"test_examples": len(self.test)}
        for name, (texts, labels) in (("biased", self.biased), ("augmented", self.augmented)):
            female = np.array([t in self.female for t in texts])
            y = np.asarray(labels)
            out[name] = {
                "examples": len(texts),
                "joy_share_female": float(female[y == 1].mean()),
                "not_joy_share_female": float(female[y == 0].mean()),
            }
        return out


def build_demo_data(
    rows: list[EECSentence],
    correlation: float = 0.9,
    test_fraction: float = 0.3,
    test_examples: int = 400,
    seed: int = 0,
) -> DemoData:
    """Split EEC counterfactual units, skew the training genders, and augment (see module doc)."""
    if not 0.5 <= correlation <= 1.0:
        raise FairnessError(f"correlation must be in [0.5, 1], got {correlation}")
    if not 0.0 < test_fraction < 1.0:
        raise FairnessError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    units = [p for p in counterfactual_pairs(rows) if p[0].emotion]
    joy = [u for u in units if u[0].emotion == "joy"]
    per_emotion = len(joy) // 3
    negatives = []
    for emotion in ("anger", "sadness", "fear"):
        pool = [u for u in units if u[0].emotion == emotion]
        take = rng.choice(len(pool), size=min(per_emotion, len(pool)), replace=False)
        negatives += [pool[i] for i in sorted(take)]
    chosen = joy + negatives
    order = rng.permutation(len(chosen))
    n_test = max(1, int(round(test_fraction * len(chosen))))
    test_units = [chosen[i] for i in order[:n_test]]
    train_units = [chosen[i] for i in order[n_test:]]

    biased_texts, biased_labels, aug_texts, aug_labels = [], [], [], []
    for male, female in train_units:
        label = int(male.emotion == "joy")
        stereotyped = female if label else male
        other = male if label else female
        pick = stereotyped if rng.random() < correlation else other
        biased_texts.append(pick.sentence)
        biased_labels.append(label)
        aug_texts += [pick.sentence, (other if pick is stereotyped else stereotyped).sentence]
        aug_labels += [label, label]

    psm_rows = [r for unit in train_units for r in unit]
    test_units = test_units[: max(1, test_examples // 2)]
    test = [r for unit in test_units for r in unit]
    mates = [r for male, female in test_units for r in (female, male)]
    return DemoData(
        biased=(biased_texts, biased_labels),
        augmented=(aug_texts, aug_labels),
        psm=gender_data(psm_rows),
        test=test,
        test_counterparts=mates,
        female={f.sentence for _, f in train_units},
    )
