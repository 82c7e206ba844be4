"""The cohort report of a finished federated run (cohorts.json/.md/.png) and its summary excerpt."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from fedtrust.fairness.cohorts import cohort_report

from .fairness_report import write_cohort_report
from .population import Population

log = logging.getLogger(__name__)


def cohort_summary(
    run_dir: Path, population: Population, model: nn.Module, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per-cohort accuracy of the final `model`; the summary's excerpt of it."""
    try:
        report = cohort_report(population.task, model, population, rows)
    except ValueError as err:
        log.warning("no cohort report: %s", err)
        return {"error": str(err)}
    write_cohort_report(report, run_dir)
    activity = report["by"]["activity"]
    return {
        "source": report["source"],
        "worst_gap": report["worst_gap"],
        "activity": {
            "gap": activity["gap"],
            "worst": activity["worst"],
            **{r["cohort"]: r["accuracy"] for r in activity["cohorts"]},
        },
        "lightest_cohort_never_selected": activity["cohorts"][0]["never_selected"],
    }
