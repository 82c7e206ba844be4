"""TensorBoard logging (`run.tensorboard = true`): read the event files back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import tiny_run_config

from fedtrust.simulations.runner import simulate
from fedtrust.simulations.tensorboard import TENSORBOARD_FOLDER, TensorBoardLog, scalars


def _events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's event files: [(step, value)] in the order TensorBoard
    shows them (after purging steps a resumed run rewrote)."""
    acc = EventAccumulator(str(run_dir / TENSORBOARD_FOLDER), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _row(r: int, loss: float) -> dict:
    return {
        "round": r,
        "loss": loss,
        "accuracy": 1.0 - loss,
        "train_loss": loss + 0.5,
        "devices": [3, 1, 4],  # lists, strings and flags are no scalars
        "inclusion": [0.1, 0.2, 0.3],
        "relation": "replace-one",
        "skipped": False,
        "epsilon": 2,  # ints are
        "cohort": {"worst": loss * 2, "name": "q1"},  # nested dicts: key/subkey
        "seconds": 1.5 * r,
    }


def test_scalars_keep_numbers_and_skip_lists_strings_flags_and_the_round():
    assert dict(scalars(_row(2, 0.25))) == {
        "loss": 0.25,
        "accuracy": 0.75,
        "train_loss": 0.75,
        "epsilon": 2.0,
        "cohort/worst": 0.5,
        "seconds": 3.0,
    }


def test_every_numeric_metric_is_a_scalar_with_the_round_as_step(tmp_path):
    log = TensorBoardLog(tmp_path)
    log.on_start(1, _row(0, 1.0))  # round 0: the initial model
    for r in (1, 2):
        log.on_round(_row(r, 1.0 / (r + 1)))
    events = _events(tmp_path)  # readable before close: every round is flushed
    log.close()
    assert set(events) == {"loss", "accuracy", "train_loss", "epsilon", "cohort/worst", "seconds"}
    assert [s for s, _ in events["loss"]] == [0, 1, 2]
    assert [v for _, v in events["loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [v for _, v in events["cohort/worst"]] == pytest.approx([2.0, 1.0, 2 / 3])


def test_a_resumed_run_writes_every_round_once(tmp_path):
    first = TensorBoardLog(tmp_path)
    first.on_start(1, _row(0, 1.0))
    for r in (1, 2, 3):  # this process wrote round 3 too, but the run resumes after round 2
        first.on_round(_row(r, 0.9 - 0.1 * r))
    first.close()

    resumed = TensorBoardLog(tmp_path)
    resumed.on_start(3, _row(2, 0.7))  # the checkpoint's row is round 2's
    for r in (3, 4):
        resumed.on_round(_row(r, 0.05 * r))  # other values than the first process's round 3
    resumed.close()

    events = _events(tmp_path)
    assert len(list(tmp_path.joinpath(TENSORBOARD_FOLDER).iterdir())) == 2  # one file a process
    for tag in ("loss", "seconds", "cohort/worst"):
        assert [s for s, _ in events[tag]] == [0, 1, 2, 3, 4], tag
    assert [v for _, v in events["loss"]] == pytest.approx([1.0, 0.8, 0.7, 0.15, 0.2])


def test_a_resume_from_a_checkpoint_without_its_row_keeps_that_rounds_events(tmp_path):
    first = TensorBoardLog(tmp_path)
    first.on_start(1, _row(0, 1.0))
    for r in (1, 2, 3):
        first.on_round(_row(r, 0.9 - 0.1 * r))
    first.close()

    resumed = TensorBoardLog(tmp_path)
    resumed.on_start(3, {})  # an old checkpoint: round 2's row is not known again
    resumed.on_round(_row(3, 0.15))
    resumed.close()

    loss = _events(tmp_path)["loss"]
    assert [s for s, _ in loss] == [0, 1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([1.0, 0.8, 0.7, 0.15])


@pytest.mark.slow  # Flower simulation engine + Ray
def test_a_simulation_with_tensorboard_writes_its_metrics_as_events(
    tmp_path, tiny_bert, intent_jsonl
):
    cfg = tiny_run_config(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "tb",
        "partition.num_devices=10",
        "selection.devices_per_round=3",
        "server.rounds=2",
        "client.steps=3",
        "client.batch_size=16",
        "run.tensorboard=true",
    )
    run_dir, _ = simulate(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = _events(run_dir)
    assert {"loss", "accuracy", "train_loss", "seconds"} <= set(events)
    assert not {"devices", "available", "inclusion", "failures", "round"} & set(events)
    for tag in ("loss", "accuracy"):
        assert [s for s, _ in events[tag]] == [r["round"] for r in rows] == [0, 1, 2]
        assert [v for _, v in events[tag]] == pytest.approx([r[tag] for r in rows], rel=1e-6)
    assert [s for s, _ in events["train_loss"]] == [1, 2]  # round 0 did not train
