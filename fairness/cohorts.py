"""Per-cohort accuracy of a federated run's final model: who does the model serve well?

A device's accuracy is measured in one of two ways, whichever the data allows:
- `device test rows`: the held-out rows carry the device (user) id — Shakespeare's roles, a user
  file with a device column — so each device is scored on its own held-out examples;
- `label mix` (intent tasks whose test split has no user ids, e.g. CLINC150): the test accuracy of
  every intent, averaged with the device's own label proportions — the accuracy a user with that
  device's mix of requests would see.

Devices are grouped into cohorts by activity (quantiles of the examples they hold) and by the data's
own device attribute (`task.cohort_column`, the most common value on the device). Each cohort
reports its mean device accuracy (every device counts once), how often its devices were selected,
and the share never selected; the worst-cohort gap is the spread of cohort accuracies.

Beyond these fixed groupings the report *discovers* the cohorts the model fails
(`fedtrust.fairness.discovery`): attribute splits over what is known of every device (activity,
mean example length, label mix, the cohort column) and k-means clusters of the model's sentence
embeddings of held-out examples, each with bootstrap confidence intervals.
The report files (cohorts.json/.md/.png) are written by `fedtrust.simulations.fairness_report`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import nn

from fedtrust.errors import FairnessError
from fedtrust.tasks.base import Task

from .discovery import attribute_cohorts, bottom_share, embedding_clusters

MIN_DEVICE_SHARE = 0.5  # intent: below this share of devices with test rows, use the label mix


class DevicePopulation(Protocol):
    """What the cohort report reads of a federated population: each device's training rows."""

    parts: list[np.ndarray]  # per device, indices into task.train
    names: list[str]

    @property
    def size(self) -> int: ...

    def sizes(self) -> np.ndarray: ...


def device_accuracy(
    task: Task,
    model: nn.Module,
    parts: list[np.ndarray],
    names: list[str],
    batch_size: int = 256,
    test_hits: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, str]:
    """(accuracy per device, NaN where unknown; how it was measured). `test_hits`: the model's
    `task.example_hits` on `task.test`, when the caller already has them."""
    hits, units = test_hits or task.example_hits(model, task.test, batch_size)
    index = {name: d for d, name in enumerate(names)}
    owner = np.asarray([index.get(str(r.get("device")), -1) for r in task.test])
    known = owner >= 0
    enough = len(set(owner[known])) >= MIN_DEVICE_SHARE * len(names)
    if known.any() and (enough or task.kind != "intent"):
        correct = np.bincount(owner[known], hits[known], minlength=len(names))
        total = np.bincount(owner[known], units[known], minlength=len(names))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, correct / total, np.nan), "device test rows"
    if task.kind != "intent":
        raise FairnessError(
            "cohort accuracy needs test rows with device ids for this task "
            "(the test split has none)"
        )
    labels = np.asarray([r["labels"] for r in task.test])
    n = max(labels.max(), max(r["labels"] for r in task.train)) + 1
    per_label_total = np.bincount(labels, minlength=n)
    per_label = np.bincount(labels, hits, minlength=n) / np.maximum(per_label_total, 1)
    tested = per_label_total > 0
    acc = np.full(len(parts), np.nan)
    for d, part in enumerate(parts):
        mix = np.bincount([task.train[i]["labels"] for i in part], minlength=n) * tested
        if mix.sum() > 0:
            acc[d] = float(mix @ per_label / mix.sum())
    return acc, "label mix"


def activity_cohorts(sizes: np.ndarray, quantiles: int = 4) -> tuple[np.ndarray, list[str]]:
    """Cohort index per device by quantile of its example count, and readable names."""
    edges = np.unique(np.quantile(sizes, np.linspace(0, 1, quantiles + 1)[1:-1]))
    edges = edges[edges > sizes.min()]  # ties at the bottom: no empty lowest cohort
    which = np.searchsorted(edges, sizes, side="right")
    names = []
    for c in range(len(edges) + 1):
        members = sizes[which == c]
        names.append(
            f"Q{c + 1}: {members.min()}–{members.max()} examples" if len(members) else f"Q{c + 1}"
        )
    return which, names


def cohort_table(
    accuracy: np.ndarray,
    groups: np.ndarray,
    group_names: list[str],
    selections: np.ndarray,
    rounds: int,
) -> dict[str, Any]:
    """Mean device accuracy, selections and never-selected share per cohort; the worst gap."""
    rows = []
    for g, name in enumerate(group_names):
        members = groups == g
        if not members.any():
            continue
        scored = members & ~np.isnan(accuracy)
        rows.append(
            {
                "cohort": name,
                "devices": int(members.sum()),
                "accuracy": float(accuracy[scored].mean()) if scored.any() else None,
                "selected_per_device": float(selections[members].mean()),
                "selection_rate": float(selections[members].mean() / max(rounds, 1)),
                "never_selected": float((selections[members] == 0).mean()),
            }
        )
    scored = [r for r in rows if r["accuracy"] is not None]
    if len(scored) < 1:
        return {"cohorts": rows, "gap": None, "worst": None, "best": None}
    worst = min(scored, key=lambda r: r["accuracy"])
    best = max(scored, key=lambda r: r["accuracy"])
    return {
        "cohorts": rows,
        "gap": best["accuracy"] - worst["accuracy"],
        "worst": worst["cohort"],
        "best": best["cohort"],
    }


@dataclass(frozen=True)
class Discovery:
    """How cohorts are discovered (see `fedtrust.fairness.discovery`)."""

    min_devices: int = 10
    clusters: int = 8  # 0 = no embedding clusters
    embed_examples: int = 2000
    resamples: int = 1000
    seed: int = 0
    public_only: bool = False  # split on activity only (counts are public under DP)
    max_share: float = 0.5  # a discovered cohort holds at most this share of the devices


def cohort_report(
    task: Task,
    model: nn.Module,
    population: DevicePopulation,
    metrics: list[dict[str, Any]],
    quantiles: int = 4,
    discovery: Discovery | None = None,
) -> dict[str, Any]:
    """Cohort tables by activity and by the data's device attribute, for one run; with
    `discovery`, also the worst discovered cohorts and embedding clusters."""
    test_hits = task.example_hits(model, task.test)  # one pass, for devices and clusters
    accuracy, source = device_accuracy(
        task, model, population.parts, population.names, test_hits=test_hits
    )
    history = [r for r in metrics if r.get("round", 0) > 0]
    selections = np.zeros(population.size)
    for r in history:
        for d in r.get("devices", []):
            selections[d] += 1
    sizes = population.sizes()
    groups, names = activity_cohorts(sizes, quantiles)
    report = {
        "source": source,
        "devices": population.size,
        "devices_scored": int((~np.isnan(accuracy)).sum()),
        "rounds": len(history),
        "by": {"activity": cohort_table(accuracy, groups, names, selections, len(history))},
    }
    attribute = _device_attribute(task, population.parts)
    if attribute is not None:
        values = sorted(set(attribute))
        groups = np.asarray([values.index(v) for v in attribute])
        report["by"]["attribute"] = cohort_table(accuracy, groups, values, selections, len(history))
    gaps = {by: t["gap"] for by, t in report["by"].items() if t["gap"] is not None}
    report["worst_gap"] = max(gaps.values()) if gaps else None
    if discovery is not None:
        attributes = device_attributes(task, population.parts)
        if discovery.public_only:
            attributes = {"activity": attributes["activity"]}
        found = attribute_cohorts(
            accuracy,
            attributes,
            sizes.astype(float),
            min_devices=discovery.min_devices,
            resamples=discovery.resamples,
            seed=discovery.seed,
            max_share=discovery.max_share,
        )
        report["discovered"] = {
            "attributes": sorted(attributes),
            "cohorts": [c.to_dict() for c in found],
            "bottom_share": bottom_share(found),
            "notes": _discovery_notes(source, discovery),
        }
        if discovery.clusters > 0:
            clusters = held_out_clusters(task, model, discovery, test_hits)
            report["clusters"] = [c.to_dict() for c in clusters]
    return report


def device_attributes(task: Task, parts: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What is known of every device to split on: activity, mean example length, the label mix
    (intent: the share of its most common intent, its entropy, that intent) and the data's
    cohort column."""
    out = {
        "activity": np.asarray([len(p) for p in parts], float),
        "mean length": np.asarray(
            [
                np.mean([len(task.train[i]["input_ids"]) for i in p]) if len(p) else np.nan
                for p in parts
            ]
        ),
    }
    if task.kind == "intent":
        top, share, entropy = [], [], []
        for part in parts:
            counts = Counter(task.train[i]["labels"] for i in part)
            label, most = counts.most_common(1)[0] if counts else (-1, 0)
            p = np.asarray(list(counts.values()), float) / max(len(part), 1)
            top.append(_label_name(task, label))
            share.append(most / max(len(part), 1))
            entropy.append(float(-(p * np.log2(p)).sum()) if len(p) else np.nan)
        out |= {
            "top intent": np.asarray(top, object),
            "top intent share": np.asarray(share),
            "label entropy": np.asarray(entropy),
        }
    attribute = _device_attribute(task, parts)
    if attribute is not None:
        out["cohort"] = np.asarray(attribute, object)
    return out


def held_out_clusters(
    task: Task,
    model: nn.Module,
    discovery: Discovery,
    test_hits: tuple[np.ndarray, np.ndarray],
) -> list:
    """k-means clusters of the model's embeddings of (up to `embed_examples`) test rows, worst
    first: computed by the server on its own held-out data, nothing leaves a device.
    `test_hits`: the model's `task.example_hits` on `task.test`."""
    rng = np.random.default_rng(discovery.seed)
    take = min(discovery.embed_examples, len(task.test))
    chosen = np.sort(rng.choice(len(task.test), take, replace=False))
    rows = [task.test[i] for i in chosen]
    if len(rows) < 2:
        return []
    hits, units = test_hits
    correct = hits[chosen] / np.maximum(units[chosen], 1)
    return embedding_clusters(
        task.embed(model, rows),
        correct,
        [task.decode(r) for r in rows],
        clusters=discovery.clusters,
        seed=discovery.seed,
        resamples=discovery.resamples,
    )


def _discovery_notes(source: str, discovery: Discovery) -> list[str]:
    notes = []
    if source == "label mix":
        notes.append(
            "device accuracy is the per-intent test accuracy weighted by the device's label "
            "mix, so label-mix splits restate which intents the model gets wrong, and their "
            "intervals ignore the test set's own sampling noise"
        )
    if discovery.public_only:
        notes.append(
            "DP run: splits use activity only (example counts are public in the threat model); "
            "the report is an evaluation by the simulator, which holds every device's data, "
            "not a release covered by the run's epsilon"
        )
    return notes


def _label_name(task: Task, label: int) -> str:
    names = getattr(task, "labels", ())
    return str(names[label]) if 0 <= label < len(names) else str(label)


def _device_attribute(task: Task, parts: list[np.ndarray]) -> list[str] | None:
    if not task.train or "cohort" not in task.train[0]:
        return None
    return [
        Counter(task.train[i]["cohort"] for i in part).most_common(1)[0][0] if len(part) else "?"
        for part in parts
    ]
