"""A device's own DP budget: kept on the device, never taken from the server's messages.

Under sample-level DP each device accounts its own examples' privacy. Its accountant history
(one `(noise_multiplier, sample_rate, steps)` entry per participation, keyed by round) lives in
the device's persistent storage, so a dishonest server cannot reset it by sending an empty
history. On a real device that storage is the node config's `state-dir`; in a simulation it is
the run folder's `devices/` (the simulation plays both sides).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

STATE_DIR = "devices"


def planned_participations(rounds: int, per_round: int, num_devices: int) -> int:
    """Participations a device budgets for by default: twice its expected number under
    uniform selection (a public function of the config, not of any device's data)."""
    return max(1, math.ceil(2 * rounds * per_round / max(num_devices, 1)))


Entry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


@dataclass
class DeviceBudget:
    """What a device remembers about the privacy it has spent: its releases, round by round."""

    device: int
    releases: list[tuple[int, Entry]] = field(default_factory=list)  # (round, entry)
    exhausted: bool = False

    @property
    def participations(self) -> int:
        return len({r for r, _ in self.releases})

    def history(self) -> list[Entry]:
        """Every release so far (what the accountant composes)."""
        return [entry for _, entry in self.releases]

    def record(self, server_round: int, spent: list[Entry]) -> None:
        """Add this round's releases (a round run again after a crash is a new release)."""
        self.releases += [(server_round, e) for e in spent if e[2] > 0]

    def forget(self, server_round: int) -> None:
        """Drop `server_round`'s releases: only for reproducible noise, where running the round
        again releases exactly the same update, so it must not be counted twice."""
        self.releases = [(r, e) for r, e in self.releases if r != server_round]


class BudgetStore:
    """Per-device budgets as small JSON files under `folder`, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, device: int) -> Path:
        return self.folder / f"{device}.json"

    def load(self, device: int) -> DeviceBudget:
        path = self._path(device)
        if not path.is_file():
            return DeviceBudget(device)
        data = json.loads(path.read_text())
        releases = [(int(r), (float(s), float(q), int(n))) for r, s, q, n in data["releases"]]
        return DeviceBudget(device, releases, bool(data["exhausted"]))

    def save(self, budget: DeviceBudget) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(budget.device)
        tmp = path.with_suffix(".json.tmp")
        releases = [[r, *entry] for r, entry in budget.releases]
        tmp.write_text(json.dumps({"releases": releases, "exhausted": budget.exhausted}))
        os.replace(tmp, path)
