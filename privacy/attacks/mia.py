"""Membership-inference attacks on per-example scores (pure numpy).

Every attack returns one score per example; HIGHER means MORE LIKELY A MEMBER, so any attack's
output goes straight into `attack_metrics(scores, is_member)`.

- `loss_attack`: the threshold-on-loss attack (Yeom et al. 2018).
- `reference_attack`: loss calibrated by reference models not trained on the examples
  (difficulty calibration, Watson et al. 2022).
- `lira_online` / `lira_offline`: the Likelihood Ratio Attack (Carlini et al. 2022, "Membership
  inference attacks from first principles") on logit-scaled confidences of shadow models.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def loss_attack(target_loss: np.ndarray) -> np.ndarray:
    """Score = -loss: members tend to have a lower loss than non-members."""
    return -_vector(target_loss, "target_loss")


def reference_attack(target_loss: np.ndarray, reference_loss: np.ndarray) -> np.ndarray:
    """Score = mean reference loss - target loss, per example.

    `reference_loss` has shape (n_refs, n_examples): losses of models trained WITHOUT the
    examples, which say how hard each example is regardless of membership.
    """
    target = _vector(target_loss, "target_loss")
    reference = _matrix(reference_loss, "reference_loss", len(target))
    return reference.mean(0) - target


def lira_online(
    target_conf: np.ndarray,
    shadow_conf: np.ndarray,
    shadow_in: np.ndarray,
    fix_variance: bool = True,
) -> np.ndarray:
    """Online LiRA: log N(c; mu_in, sigma_in) - log N(c; mu_out, sigma_out) per example.

    `shadow_conf` (n_shadows, n_examples) holds the shadow models' logit-scaled confidences and
    `shadow_in` (same shape, boolean) whether each example was in that shadow's training data.
    Means are per example. With `fix_variance` (the paper's advice for few shadows) sigma_in and
    sigma_out are global: the pooled spread of the shadow confidences around their per-example
    means; otherwise per example, falling back to the global value where an example has fewer
    than 2 shadows on that side. An example without IN (OUT) shadows gets mu_in (mu_out) from
    its other mean shifted by the average in-out gap of the examples that have both.
    """
    target, conf, is_in = _lira_inputs(target_conf, shadow_conf, shadow_in)
    _need(is_in.sum(), "IN", "lira_online")
    _need((~is_in).sum(), "OUT", "lira_online")
    mu_in, mu_out = _means(conf, is_in)
    sd_in, sd_out = _stds(conf, is_in, mu_in, mu_out, fix_variance)
    return norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)


def lira_offline(
    target_conf: np.ndarray,
    shadow_conf: np.ndarray,
    shadow_in: np.ndarray,
    fix_variance: bool = True,
) -> np.ndarray:
    """Offline LiRA: a one-sided test of the target confidence against the OUT distribution.

    The paper's score is Pr[Z < c] with Z ~ N(mu_out, sigma_out^2), one minus the p-value of
    "c comes from a non-member"; this returns -log Pr[Z > c], which ranks examples identically
    but does not saturate at 1 for confident members (what matters at low FPR). Only OUT shadows
    are used, except for examples with none: their mu_out is mu_in minus the average in-out gap
    (as in `lira_online`). Variances as in `lira_online`.
    """
    target, conf, is_in = _lira_inputs(target_conf, shadow_conf, shadow_in)
    _need((~is_in).sum(), "OUT", "lira_offline")
    mu_in, mu_out = _means(conf, is_in)
    _, sd_out = _stds(conf, is_in, mu_in, mu_out, fix_variance)
    return -norm.logsf(target, mu_out, sd_out)


def _vector(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has {int((~np.isfinite(x)).sum())} NaN or infinite values")
    return x


def _matrix(x: np.ndarray, name: str, n: int) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[1] != n or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n_models >= 1, {n}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has {int((~np.isfinite(x)).sum())} NaN or infinite values")
    return x


def _lira_inputs(
    target_conf: np.ndarray, shadow_conf: np.ndarray, shadow_in: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    target = _vector(target_conf, "target_conf")
    conf = _matrix(shadow_conf, "shadow_conf", len(target))
    is_in = np.asarray(shadow_in)
    if is_in.shape != conf.shape:
        raise ValueError(f"shadow_in has shape {is_in.shape}, shadow_conf has {conf.shape}")
    if is_in.dtype != bool:
        if not np.isin(is_in, (0, 1)).all():
            raise ValueError("shadow_in must be boolean (True = in that shadow's training data)")
        is_in = is_in.astype(bool)
    return target, conf, is_in


def _need(count: int, side: str, attack: str) -> None:
    if count < 1:
        raise ValueError(
            f"{attack} needs at least one {side} shadow confidence; there are {int(count)} "
            "(train shadows on random halves of the data so every example is IN for some)"
        )


def _means(conf: np.ndarray, is_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example IN and OUT means; a missing side is the other shifted by the mean gap."""
    n_in, n_out = is_in.sum(0), (~is_in).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(is_in, conf, 0).sum(0) / n_in
        mu_out = np.where(is_in, 0, conf).sum(0) / n_out
    both = (n_in > 0) & (n_out > 0)
    if both.any():
        gap = float(np.mean(mu_in[both] - mu_out[both]))
    elif is_in.any() and (~is_in).any():
        gap = float(conf[is_in].mean() - conf[~is_in].mean())
    else:  # one side only (offline without IN shadows): the missing means are never used
        gap = 0.0
    mu_in = np.where(n_in > 0, mu_in, mu_out + gap)
    mu_out = np.where(n_out > 0, mu_out, mu_in - gap)
    return mu_in, mu_out


def _stds(
    conf: np.ndarray,
    is_in: np.ndarray,
    mu_in: np.ndarray,
    mu_out: np.ndarray,
    fix_variance: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """IN and OUT standard deviations per example (global ones broadcast if `fix_variance`)."""
    sides = []
    for mask, mu in ((is_in, mu_in), (~is_in, mu_out)):
        sq = np.where(mask, (conf - mu) ** 2, 0.0)
        count = mask.sum(0)
        dof = int(count.sum() - (count > 0).sum())  # one mean estimated per example
        pooled = np.sqrt(sq.sum() / dof) if dof > 0 else np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            local = np.sqrt(sq.sum(0) / (count - 1))
        sides.append((pooled, local, count))
    (g_in, l_in, c_in), (g_out, l_out, c_out) = sides
    if np.isnan(g_in) and np.isnan(g_out):
        raise ValueError(
            "cannot estimate the spread of shadow confidences: no example has 2 or more IN "
            f"or 2 or more OUT shadows ({conf.shape[0]} shadows); use more shadow models"
        )
    # a side without enough repeats borrows the other side's global spread
    g_in = g_out if np.isnan(g_in) else g_in
    g_out = g_in if np.isnan(g_out) else g_out
    g_in, g_out = max(g_in, 1e-12), max(g_out, 1e-12)
    if fix_variance:
        return np.full(len(mu_in), g_in), np.full(len(mu_out), g_out)
    sd_in = np.where((c_in >= 2) & (l_in > 0), l_in, g_in)
    sd_out = np.where((c_out >= 2) & (l_out > 0), l_out, g_out)
    return sd_in, sd_out
