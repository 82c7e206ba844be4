"""Writing a fairness report leaves the user's matplotlib alone: no backend switch, no pyplot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import importlib, json, pkgutil, sys
from pathlib import Path

import fedtrust.fairness
for module in pkgutil.iter_modules(fedtrust.fairness.__path__):
    importlib.import_module("fedtrust.fairness." + module.name)
import fedtrust.simulations.fairness_cli
from fedtrust.simulations.fairness_report import write_cohort_report

row = {"cohort": "Q1", "devices": 1, "accuracy": 0.5, "selected_per_device": 1.0,
       "selection_rate": 1.0, "never_selected": 0.0}
table = {"cohorts": [row], "gap": 0.0, "worst": "Q1", "best": "Q1"}
report = {"source": "device test rows", "devices": 1, "devices_scored": 1, "rounds": 1,
          "by": {"activity": table}, "worst_gap": 0.0}
write_cohort_report(report, Path(sys.argv[1]))
import matplotlib
state = {"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules}
print(json.dumps(state))
"""


def test_reports_keep_the_users_matplotlib_backend(tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "svg", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state == {"backend": "svg", "pyplot": False}
    assert (tmp_path / "cohorts.png").read_bytes().startswith(b"\x89PNG")
