"""Cohort discovery: find the users a federation fails, without naming the cohorts in advance.

`cohorts` scores cohorts fixed beforehand; this module searches for the worst ones, two ways:

- `attribute_cohorts`: a decision-tree-style search over per-device attributes, numeric (activity,
  label entropy) or categorical (region). Depth 1 tries every split of every attribute: numeric
  thresholds at up to `MAX_CUTS` distinct quantiles (cohort: the `<= t` or the `> t` side);
  categorical one value against the rest, and CART-style prefix groups of the values sorted by
  mean accuracy. A cohort's gap is the mean accuracy of the scored devices outside it minus its
  own; a split is admissible with >= `min_devices` scored devices inside and outside. Depth 2 (and
  deeper) splits the best `BEAM` cohorts per attribute again, on another attribute or the same
  numeric one, keeping a refinement that widens the gap and is significantly worse than the rest
  of its parent (one-sided t-test at `LEVEL`, Bonferroni over the refinements tried at that
  depth): noise is not split further. The largest gap comes first; each further cohort (up to
  `top`, sorted by gap) is the one whose members not yet covered are most surely worse than the
  rest (highest lower confidence bound of their gap, Bonferroni over all candidates; > 0 with >=
  `min_devices` new scored devices): no subset, diluted superset or fragment of a returned one;
  none over `max_share` of the devices. `bottom_share`: the union's device and example share.
- `embedding_clusters`: k-means over the L2-normalised sentence embeddings of held-out examples;
  each cluster's accuracy, and the texts closest to its centroid to read what the cluster is. The
  server computes the embeddings on its own held-out examples: nothing leaves a device.

Statistical care. Every scored device counts once in a cohort's accuracy (NaN = not scored: out
of the means, still in the device and example shares). Accuracies and gaps carry percentile
bootstrap CIs (`bootstrap_ci`; devices resampled, examples for clusters). A cohort is `too_small`
with fewer than `min_devices` scored devices or a gap CI containing 0; a cluster below `min_size`
examples. The search keeps the largest of many gaps, so a returned gap is optimistic (winner's
curse) and its CIs are not corrected for the search: confirm a cohort on fresh data first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import t as student
from sklearn.cluster import KMeans

from fedtrust.errors import FairnessError

MAX_CUTS = 20  # numeric thresholds per attribute and parent: all distinct values up to this many
POOL = 200  # candidates (largest gaps) considered for the cohorts after the first
BEAM = 4  # cohorts per attribute refined at the next depth
LEVEL = 0.95  # of the gap's CI and the search's tests
CHUNK = 1 << 22  # bootstrap draws held in memory at once (values)

Condition = tuple[str, str, Any]  # (attribute, "<=" | ">" | "=" | "in", threshold or value(s))


def bootstrap_ci(
    values: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the (weighted) mean: the units (devices or examples) are
    resampled with replacement, `resamples` times. NaN values are dropped; no values: (nan, nan)."""
    v = np.asarray(values, dtype=float).ravel()
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float).ravel()
    if w.shape != v.shape or (w < 0).any():
        raise FairnessError(f"bootstrap: need {len(v)} weights, all >= 0 (got {len(w)})")
    if not 0 < level < 1 or resamples < 1:
        raise FairnessError(f"bootstrap: need 0 < level < 1, resamples >= 1 ({level}, {resamples})")
    return _interval(_boot_means(v, w, resamples, seed), level)


def _boot_means(v: np.ndarray, w: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """`resamples` bootstrap means of v weighted by w, vectorised in chunks of `CHUNK` draws."""
    v, w = v[~np.isnan(v)], w[~np.isnan(v)]
    means = np.full(resamples, np.nan)  # stays NaN for a draw of zero total weight
    rng = np.random.default_rng(seed)
    step = max(1, CHUNK // max(len(v), 1))
    for start in range(0, resamples if len(v) else 0, step):
        draw = rng.integers(0, len(v), size=(min(step, resamples - start), len(v)))
        num, den = (w[draw] * v[draw]).sum(axis=1), w[draw].sum(axis=1)
        np.divide(num, den, out=means[start : start + len(draw)], where=den > 0)
    return means


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    if np.isnan(draws).all():
        return float("nan"), float("nan")
    low, high = np.nanquantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(eq=False)  # the mask makes == ambiguous
class Cohort:
    """A group of devices and how the model serves it, against every other scored device."""

    rule: str  # readable, e.g. "activity <= 6 and region = north"
    members: np.ndarray  # bool mask over devices
    devices: int
    examples: int  # the members' example counts, summed
    device_share: float
    example_share: float
    accuracy: float  # mean device accuracy of the scored members (each counts once)
    ci: tuple[float, float]  # bootstrap CI of that mean
    rest_accuracy: float  # mean accuracy of the scored devices outside the cohort
    gap: float  # rest_accuracy - accuracy
    gap_ci: tuple[float, float]  # bootstrap CI of the gap (cohort and rest resampled apart)
    too_small: bool  # < min_devices scored members, or the gap's CI contains 0
    scored: int = 0  # members with an accuracy
    device_examples: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the members as a count, NaN as None."""
        fields = {k: _json(v) for k, v in vars(self).items() if k != "device_examples"}
        return {**fields, "members": int(self.members.sum())}


def cohort_of(
    rule: str,
    members: np.ndarray,
    accuracy: np.ndarray,
    examples: np.ndarray,
    *,
    min_devices: int = 10,
    resamples: int = 1000,
    seed: int = 0,
) -> Cohort:
    """Score one cohort (a bool mask over devices) against the scored devices outside it."""
    members = np.asarray(members, dtype=bool)
    acc, ex = _check(accuracy, examples)
    if members.shape != acc.shape:
        raise FairnessError(f"cohort '{rule}': a mask of {len(members)} for {len(acc)} devices")
    scored = ~np.isnan(acc)
    inside, rest = acc[members & scored], acc[~members & scored]
    mean = float(inside.mean()) if len(inside) else float("nan")
    rest_mean = float(rest.mean()) if len(rest) else float("nan")
    ci = bootstrap_ci(inside, resamples=resamples, seed=seed)
    draws = _boot_means(rest, np.ones_like(rest), resamples, seed + 1)
    gap_ci = _interval(draws - _boot_means(inside, np.ones_like(inside), resamples, seed), LEVEL)
    return Cohort(
        rule=rule,
        members=members,
        devices=int(members.sum()),
        examples=int(ex[members].sum()),
        device_share=float(members.mean()) if len(members) else 0.0,
        example_share=float(ex[members].sum() / ex.sum()) if ex.sum() > 0 else 0.0,
        accuracy=mean,
        ci=ci,
        rest_accuracy=rest_mean,
        gap=rest_mean - mean,
        gap_ci=gap_ci,
        too_small=bool(len(inside) < min_devices or not (gap_ci[0] > 0 or gap_ci[1] < 0)),
        scored=len(inside),
        device_examples=ex,
    )


def attribute_cohorts(
    accuracy: np.ndarray,
    attributes: dict[str, np.ndarray],
    examples: np.ndarray,
    *,
    min_devices: int = 10,
    max_depth: int = 2,
    top: int = 3,
    resamples: int = 1000,
    seed: int = 0,
    max_share: float = 1.0,
) -> list[Cohort]:
    """The `top` worst cohorts by gap (largest first, each at most `max_share` of the devices),
    found by the search in the module docstring; [] when none is admissible with a positive gap."""
    acc, ex = _check(accuracy, examples)
    if min_devices < 1 or max_depth < 1:
        raise FairnessError(f"min_devices and max_depth must be >= 1 ({min_devices}, {max_depth})")
    columns = {name: _column(name, values, len(acc)) for name, values in attributes.items()}
    scored = ~np.isnan(acc)
    a, found = np.where(scored, acc, 0.0), {}
    frontier = [_Candidate((), np.ones(len(acc), dtype=bool), 0.0)]
    for depth in range(1, max_depth + 1):
        kids = [_refine(p, columns, a, scored, min_devices, first=depth == 1) for p in frontier]
        cut = (1 - LEVEL) / max(sum(n for _, n in kids), 1)  # Bonferroni
        grown = [c for cs, _ in kids for c in cs if c.p < cut]
        frontier = _beam([c for c in grown if found.setdefault(c.mask.tobytes(), c) is c])
    small = [c for c in found.values() if c.mask.mean() <= max_share]
    ranked = sorted(small, key=lambda c: (-c.gap, len(c.conds), -c.mask.sum()))[:POOL]
    picked = ranked[: int(top > 0)]
    while 0 < len(picked) < top:
        covered = np.logical_or.reduce([c.mask for c in picked]) & scored
        masks = np.stack([c.mask for c in ranked]) & scored
        n_new, n_out, diff, se = _compare(masks & ~covered, ~covered & scored, a)
        t = student.ppf(1 - (1 - LEVEL) / len(found), np.maximum(np.minimum(n_new, n_out) - 1, 1))
        lower = np.where((n_new >= min_devices) & (n_out >= min_devices), diff - t * se, -np.inf)
        if not np.nanmax(lower) > 0:
            break
        picked.append(ranked[int(np.nanargmax(lower))])
    picked.sort(key=lambda c: -c.gap)
    score = {"min_devices": min_devices, "resamples": resamples, "seed": seed}
    return [cohort_of(_rule(c.conds), c.mask, acc, ex, **score) for c in picked]


def bottom_share(cohorts: list[Cohort]) -> dict[str, Any]:
    """The bottom-cohort share: devices and examples in the union of the cohorts' members."""
    if len({len(c.members) for c in cohorts}) > 1:
        raise FairnessError("bottom_share: cohorts over different device populations")
    union = np.logical_or.reduce([c.members for c in cohorts]) if cohorts else np.zeros(0, bool)
    ex = next((c.device_examples for c in cohorts if c.device_examples is not None), union * 0.0)
    return {
        "cohorts": len(cohorts),
        "devices": int(union.sum()),
        "examples": int(ex[union].sum()),
        "device_share": float(union.mean()) if len(union) else 0.0,
        "example_share": float(ex[union].sum() / ex.sum()) if ex.sum() > 0 else 0.0,
    }


@dataclass
class Cluster:
    """A k-means cluster of held-out examples and the model's accuracy on it."""

    cluster: int  # the k-means label
    size: int
    accuracy: float  # mean of the members' `correct`
    ci: tuple[float, float]  # bootstrap CI over the members
    examples: list[str]  # texts closest to the centroid, closest first
    too_small: bool  # size < min_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, NaN as None."""
        return {k: _json(v) for k, v in vars(self).items()}


def embedding_clusters(
    embeddings: np.ndarray,
    correct: np.ndarray,
    texts: list[str],
    *,
    clusters: int = 8,
    seed: int = 0,
    examples_per_cluster: int = 3,
    min_size: int = 20,
    resamples: int = 1000,
) -> list[Cluster]:
    """Clusters of held-out examples, worst accuracy first. `clusters` is clamped to the number
    of distinct rows; fewer than 2 rows: []."""
    x = np.asarray(embeddings, dtype=float)
    y = np.asarray(correct, dtype=float).ravel()
    if x.ndim != 2 or not (len(x) == len(y) == len(texts)):
        raise FairnessError(
            f"embedding_clusters: {x.shape} embeddings, {len(y)} scores, {len(texts)} texts"
        )
    if not np.isfinite(x).all() or not np.isfinite(y).all():
        raise FairnessError("embedding_clusters: embeddings and scores must be finite")
    if len(x) < 2 or clusters < 1:
        return []
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(clusters, len(np.unique(x, axis=0)))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    out = []
    for c in range(k):
        rows = np.flatnonzero(km.labels_ == c)
        if len(rows) == 0:
            continue
        dist = np.linalg.norm(x[rows] - km.cluster_centers_[c], axis=1)
        nearest = rows[np.argsort(dist, kind="stable")[:examples_per_cluster]]
        ci = bootstrap_ci(y[rows], resamples=resamples, seed=seed)
        examples = [texts[i] for i in nearest]
        out.append(Cluster(c, len(rows), float(y[rows].mean()), ci, examples, len(rows) < min_size))
    return sorted(out, key=lambda c: (c.accuracy, -c.size, c.cluster))


@dataclass
class _Candidate:
    conds: tuple[Condition, ...]
    mask: np.ndarray
    gap: float
    p: float = 0.0  # the refinement's p-value against the rest of its parent


def _refine(
    parent: _Candidate,
    columns: dict[str, tuple[str, np.ndarray]],
    a: np.ndarray,
    scored: np.ndarray,
    min_devices: int,
    first: bool,
) -> tuple[list[_Candidate], int]:
    """Admissible splits inside `parent`, gap > 0 (below the root: wider and significant)."""
    used = {name for name, op, _ in parent.conds if op in ("=", "in")}
    kids = [
        kid
        for name, (kind, col) in columns.items()
        if name not in used
        for kid in _splits(name, kind, col, parent.mask & scored, a)
    ]
    if not kids:
        return [], 0
    masks = np.stack([parent.mask & m for _, m in kids])
    n_in, n_out, gap, _ = _compare(masks & scored, scored, a)
    keep = (n_in >= min_devices) & (n_out >= min_devices) & (gap > 0)
    p = np.zeros(len(kids))
    if not first:  # against the rest of the parent: one-sided t-test, df of the smaller side
        _, n_sib, diff, se = _compare(masks & scored, parent.mask & scored, a)
        keep &= (gap > parent.gap) & (n_sib >= min_devices)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = student.sf(diff / se, np.maximum(np.minimum(n_in, n_sib) - 1, 1))
    picked = np.flatnonzero(keep)
    cands = [_Candidate(parent.conds + (kids[i][0],), masks[i], gap[i], p[i]) for i in picked]
    return cands, len(kids)


def _splits(
    name: str, kind: str, col: np.ndarray, within: np.ndarray, a: np.ndarray
) -> list[tuple[Condition, np.ndarray]]:
    """Candidate cohorts on one attribute, from its values among the scored devices `within`."""
    if kind == "numeric":
        vals = col[within & ~np.isnan(col)]
        distinct = np.unique(vals)
        if len(distinct) < 2:
            return []
        cuts = distinct[:-1]
        if len(cuts) > MAX_CUTS:
            qs = np.quantile(vals, np.linspace(0, 1, MAX_CUTS + 2)[1:-1], method="lower")
            cuts = np.unique(qs[qs < distinct[-1]])
        return [((name, "<=", float(t)), col <= t) for t in cuts] + [
            ((name, ">", float(t)), col > t) for t in cuts
        ]
    levels, which = np.unique(col[within], return_inverse=True)
    if len(levels) < 2:
        return []
    means = np.bincount(which, a[within]) / np.bincount(which)
    order = [str(v) for v in levels[np.argsort(means, kind="stable")]]
    out = [((name, "=", str(v)), col == v) for v in levels]
    out += [((name, "in", tuple(order[:j])), np.isin(col, order[:j])) for j in range(2, len(order))]
    return out


def _compare(inside: np.ndarray, pool: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row of `inside` (devices, a subset of `pool`) against the rest of `pool`: the two
    counts, the mean of `a` in the rest minus inside, and the standard error of that difference."""
    w = inside.astype(float)
    n1, s1, q1 = w.sum(axis=1), w @ a, w @ (a * a)
    n0, s0, q0 = pool.sum() - n1, a[pool].sum() - s1, (a[pool] ** 2).sum() - q1
    with np.errstate(invalid="ignore", divide="ignore"):
        m1, m0 = s1 / n1, s0 / n0
        v1 = np.maximum(q1 - s1 * m1, 0) / np.maximum(n1 - 1, 1)
        v0 = np.maximum(q0 - s0 * m0, 0) / np.maximum(n0 - 1, 1)
        return n1, n0, m0 - m1, np.sqrt(v1 / n1 + v0 / n0)


def _beam(cands: list[_Candidate]) -> list[_Candidate]:
    """The best `BEAM` cohorts per attribute of their last split: the parents of the next depth."""
    best: dict[str, list[_Candidate]] = {}
    for c in sorted(cands, key=lambda c: -c.gap):
        group = best.setdefault(c.conds[-1][0], [])
        if len(group) < BEAM:
            group.append(c)
    return [c for group in best.values() for c in group]


def _rule(conds: tuple[Condition, ...]) -> str:
    """Readable conjunction; two bounds on one numeric attribute read as a range."""
    text = []
    for name in dict.fromkeys(c[0] for c in conds):
        cs = [(op, v) for n, op, v in conds if n == name]
        low = max((v for op, v in cs if op == ">"), default=None)
        high = min((v for op, v in cs if op == "<="), default=None)
        if low is not None or high is not None:
            left = f"{low:.6g} < " if low is not None and high is not None else ""
            right = f" <= {high:.6g}" if high is not None else f" > {low:.6g}"
            text.append(f"{left}{name}{right}")
        text += [
            f"{name} = {v}" if op == "=" else f"{name} in {{{', '.join(v)}}}"
            for op, v in cs
            if op in ("=", "in")
        ]
    return " and ".join(text)


def _check(accuracy: np.ndarray, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acc = np.asarray(accuracy, dtype=float).ravel()
    ex = np.asarray(examples, dtype=float).ravel()
    if acc.shape != ex.shape:
        raise FairnessError(f"{len(acc)} device accuracies but {len(ex)} example counts")
    return acc, ex


def _column(name: str, values: np.ndarray, n: int) -> tuple[str, np.ndarray]:
    """("numeric", float array) or ("categorical", str array) for one attribute."""
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise FairnessError(f"attribute '{name}': shape {arr.shape}, expected ({n},)")
    if arr.dtype.kind in "iuf":
        return "numeric", arr.astype(float)
    return "categorical", np.asarray([str(v) for v in arr.tolist()])


def _json(x: Any) -> Any:
    """A plain JSON value: tuples as lists, numpy scalars as Python ones, NaN as None."""
    if isinstance(x, tuple | list):
        return [_json(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    return None if isinstance(x, float) and not np.isfinite(x) else x
