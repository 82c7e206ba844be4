"""The cohort report of a finished federated run (cohorts.json/.md/.png) and its summary excerpt."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from fedtrust.errors import DataError
from fedtrust.fairness.cohorts import Discovery, cohort_report
from fedtrust.tasks import Task
from fedtrust.tasks.rejection import oos_rejection

from .config import CohortConfig
from .fairness_report import write_cohort_report
from .population import Population

log = logging.getLogger(__name__)


def cohort_summary(
    run_dir: Path,
    population: Population,
    model: nn.Module,
    rows: list[dict[str, Any]],
    settings: CohortConfig,
    seed: int = 0,
    private: bool = False,
) -> dict[str, Any]:
    """Per-cohort accuracy of the final `model`, discovered cohorts; the summary's excerpt."""
    discovery = Discovery(
        min_devices=settings.min_devices,
        clusters=settings.clusters,
        embed_examples=settings.embed_examples,
        resamples=settings.resamples,
        seed=seed,
        public_only=private,
        max_share=settings.max_share,
    )
    try:
        report = cohort_report(
            population.task, model, population, rows, settings.quantiles, discovery
        )
    except ValueError as err:
        log.warning("no cohort report: %s", err)
        return {"error": str(err)}
    write_cohort_report(report, run_dir, population.task.primary_metric)
    return summary_excerpt(report)


def summary_excerpt(report: dict[str, Any]) -> dict[str, Any]:
    """What summary.json (and `fedtrust compare`) keeps of a cohort report."""
    activity = report["by"]["activity"]
    quartiles = activity["cohorts"]
    found = report.get("discovered", {}).get("cohorts", [])
    clusters = report.get("clusters", [])
    return {
        "source": report["source"],
        "worst_gap": report["worst_gap"],
        "activity": {
            "gap": activity["gap"],
            "worst": activity["worst"],
            "lightest": quartiles[0]["accuracy"],
            **{r["cohort"]: r["accuracy"] for r in quartiles},
        },
        "lightest_cohort_never_selected": quartiles[0]["never_selected"],
        "quartiles_never_selected": sum(r["never_selected"] == 1.0 for r in quartiles),
        "discovered": _brief(found[0]) if found else None,
        "worst_cluster": _brief(clusters[0]) if clusters else None,
    }


def _brief(cohort: dict[str, Any]) -> dict[str, Any]:
    """Without example texts (they stay in cohorts.json)."""
    return {
        k: v
        for k, v in cohort.items()
        if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v))
    }


def oos_summary(task: Task, model: nn.Module, score: str) -> dict[str, Any] | None:
    """Out-of-scope rejection (intent tasks with an "oos" label and a validation split): the
    users whose requests the assistant cannot serve. None when off or not applicable."""
    if score == "none" or task.kind != "intent":
        return None
    try:
        return oos_rejection(task, model, score=score)
    except DataError as err:
        log.info("no out-of-scope rejection: %s", err)
        return None
