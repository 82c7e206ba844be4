"""metrics.jsonl across a stop and a resume: one line per round, none lost, none doubled."""

from __future__ import annotations

from fedtrust.simulations.run_folder import read_metrics
from fedtrust.simulations.runner import MetricsLog


def _rows(*rounds):
    return [{"round": r, "accuracy": r / 10} for r in rounds]


def test_a_fresh_run_starts_with_round_zero(tmp_path):
    log = MetricsLog(tmp_path, extra={"noise": "warning"})
    (tmp_path / "metrics.jsonl").write_text('{"round": 7}\n')  # left over: replaced
    log.on_start(1, _rows(0)[0])
    log.on_round(_rows(1)[0])
    assert read_metrics(tmp_path) == [_rows(0)[0], {**_rows(1)[0], "noise": "warning"}]


def test_a_stop_right_after_the_checkpoint_loses_no_round(tmp_path):
    log = MetricsLog(tmp_path)
    log.on_start(1, _rows(0)[0])
    log.on_round(_rows(1)[0])  # round 2's checkpoint was written, then the process died
    log = MetricsLog(tmp_path)
    log.on_start(3, _rows(2)[0])  # resumed from round 2's checkpoint, which keeps its row
    log.on_round(_rows(3)[0])
    assert read_metrics(tmp_path) == _rows(0, 1, 2, 3)


def test_lines_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"round": {r}}}\n' for r in range(5)))
    MetricsLog(tmp_path).on_start(3, {"round": 2, "from": "checkpoint"})
    assert read_metrics(tmp_path) == [
        {"round": 0},
        {"round": 1},
        {"round": 2, "from": "checkpoint"},
    ]
