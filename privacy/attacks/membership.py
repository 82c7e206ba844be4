"""Membership inference on one target model: every attack its inputs allow, with metrics."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from fedtrust.errors import DataError

from .metrics import attack_metrics, roc_points
from .mia import lira_offline, lira_online, loss_attack, reference_attack


def check_disjoint(members: list[dict[str, Any]], non_members: list[dict[str, Any]]) -> None:
    """A non-member identical to a member would be scored as both: refuse the split."""
    seen = {tuple(r["input_ids"]) for r in members}
    clash = [i for i, r in enumerate(non_members) if tuple(r["input_ids"]) in seen]
    if clash:
        raise DataError(
            f"{len(clash)} non-member rows are identical to member rows (first: non-member "
            f"#{clash[0]}); members and non-members must not overlap"
        )


def membership_inference(
    target: dict[str, np.ndarray],
    is_member: np.ndarray,
    shadows: list[dict[str, np.ndarray]] | None = None,
    shadow_in: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Every attack the inputs allow: metrics and ROC points (`roc`: (fpr, tpr)) per attack.

    `target`/`shadows` hold `example_scores` output on the same rows; `shadow_in[s, i]` says
    whether shadow s trained on row i. Without shadows only the loss attack runs; with them
    also the reference attack (when some shadow left an example out) and LiRA offline and
    online (when shadows both trained on and left out examples).
    """
    scores = {"loss": loss_attack(target["loss"])}
    if shadows:
        assert shadow_in is not None, "shadows need shadow_in"
        conf = np.stack([s["confidence"] for s in shadows])
        loss = np.stack([s["loss"] for s in shadows])
        out = ~shadow_in
        if out.any():  # examples no shadow left out: the mean over all left-out losses
            out_loss = np.where(out, loss, np.nan)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ref = np.nanmean(out_loss, axis=0)
            ref = np.where(np.isnan(ref), np.nanmean(out_loss), ref)
            scores["reference"] = reference_attack(target["loss"], ref[None, :])
        scores["lira_offline"] = lira_offline(target["confidence"], conf, shadow_in)
        if shadow_in.any() and out.any():
            scores["lira_online"] = lira_online(target["confidence"], conf, shadow_in)
    results = {}
    for name, s in scores.items():
        fpr, tpr = roc_points(s, is_member)
        results[name] = {**attack_metrics(s, is_member), "roc": (fpr, tpr)}
    return results
