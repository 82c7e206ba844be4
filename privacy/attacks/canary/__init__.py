"""Canary extraction: does a text classifier memorise a secret planted in its training data?

`data`: the canaries (``"my pin code is 3 7 1 9"`` inserted ``repetitions`` times with a chosen
label) and decoys, encoded as training rows; `extraction`: the white-box attacks
(`extract_secret`, model inversion; `exposure`, the secret's rank among all candidates);
`summary`: both attacks on every canary, and their means per repetition level.

Usage::

    canaries = make_canaries(task.labels)
    task.train += canary_rows(canaries, tokenizer, task.labels, max_length=32)
    ...  # train the model
    results = canary_report(model, tokenizer, canaries, labels=task.labels)
    summarise(results)  # per repetition level: exact-match rate, token accuracy, exposure
"""

from .data import DIGITS, TEMPLATES, Canary, LabelIndex, canary_rows, decoy_rows, make_canaries
from .extraction import ExtractionResult, exposure, extract_secret, log_odds
from .summary import canary_report, summarise

__all__ = [
    "DIGITS",
    "TEMPLATES",
    "Canary",
    "ExtractionResult",
    "LabelIndex",
    "canary_report",
    "canary_rows",
    "decoy_rows",
    "exposure",
    "extract_secret",
    "log_odds",
    "make_canaries",
    "summarise",
]
