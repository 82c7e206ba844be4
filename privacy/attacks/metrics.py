"""How well a membership-inference attack works: ROC AUC, advantage, TPR at low FPR, ROC points."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

FPR_LEVELS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}


def roc_points(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The attack's full ROC curve as (fpr, tpr); every threshold kept, none interpolated."""
    scores, members = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(members, scores, drop_intermediate=False)
    return fpr, tpr


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """AUC, membership advantage (max TPR - FPR) and the largest TPR at FPR <= 1% and 0.1%.

    `scores` are higher for examples the attack thinks are members; `is_member` is the truth.
    Low-FPR TPRs are the paper's headline numbers (Carlini et al. 2022): with n non-members an
    FPR of 0.1% means at most n / 1000 false positives, so it needs n >= 1000 to be meaningful.
    """
    scores, members = _check(scores, is_member)
    fpr, tpr = roc_points(scores, members)
    out = {
        "auc": float(roc_auc_score(members, scores)),
        "advantage": float(np.max(tpr - fpr)),
    }
    for name, level in FPR_LEVELS.items():
        out[name] = float(tpr[fpr <= level].max())  # fpr[0] == 0, so never empty
    out["members"] = int(members.sum())
    out["non_members"] = int((~members).sum())
    return out


def _check(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float)
    members = np.asarray(is_member)
    if scores.ndim != 1 or members.shape != scores.shape:
        raise ValueError(
            f"scores and is_member must be 1-D of the same length, got {scores.shape} "
            f"and {members.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError(f"scores has {int((~np.isfinite(scores)).sum())} NaN or infinite values")
    if members.dtype != bool:
        if not np.isin(members, (0, 1)).all():
            raise ValueError("is_member must be boolean (True = member)")
        members = members.astype(bool)
    if members.all() or not members.any():
        raise ValueError(
            f"attack metrics need both members and non-members; got {int(members.sum())} "
            f"members and {int((~members).sum())} non-members"
        )
    return scores, members
