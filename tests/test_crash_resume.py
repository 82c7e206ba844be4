"""Kill -9 anywhere, then `--resume`: the same final model as an uninterrupted run.

The slow tests run `fedtrust simulate` in a subprocess that SIGKILLs itself at a chosen point
(mid-round, between the checkpoint's two renames, during the final evaluation), then
`fedtrust simulate --resume` in another, and compare the final model tensor by tensor with an
uninterrupted run of the same config. The fast ones kill a process inside `save_checkpoint` and
load what it left, and feed the CLI bad `--resume` folders.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from safetensors.numpy import load_file
from tiny_runs import tiny_run_config
from typer.testing import CliRunner

from fedtrust.errors import RunFolderError
from fedtrust.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtrust.simulations.cli import app
from fedtrust.simulations.run_folder import read_metrics, write_config, write_metrics

# Runs `fedtrust simulate ARGS` and SIGKILLs the process at $FEDTRUST_KILL_AT.
KILLER = """
import json, os, signal, sys
from pathlib import Path

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

point = os.environ["FEDTRUST_KILL_AT"]
if point == "aggregate-round-2":  # mid-round: replies in, nothing aggregated or saved
    from fedtrust.server.strategy import DeviceSampling
    aggregate = DeviceSampling.aggregate_train
    def aggregate_train(self, server_round, *args, **kwargs):
        if server_round == 2:
            die()
        return aggregate(self, server_round, *args, **kwargs)
    DeviceSampling.aggregate_train = aggregate_train
elif point == "between-renames-round-2":  # checkpoint/ -> .checkpoint.old/ done, tmp not yet in
    rename = Path.rename
    def killing_rename(self, target):
        result = rename(self, target)
        new = self.parent / ".checkpoint.tmp" / "round.json"
        if Path(target).name == ".checkpoint.old" and json.loads(new.read_text())["round"] == 2:
            die()
        return result
    Path.rename = killing_rename
elif point == "final-evaluation":  # every round's checkpoint written, no model/ or summary yet
    from fedtrust.server.evaluation import CentralEvaluator
    evaluate = CentralEvaluator.__call__
    def call(self, *args, **kwargs):
        if kwargs.get("full"):
            die()
        return evaluate(self, *args, **kwargs)
    CentralEvaluator.__call__ = call
elif point == "in-save-after-first-file":  # save_checkpoint only: model.safetensors of round 2
    import fedtrust.server.checkpoint as ckpt
    write = ckpt._write
    def killing_write(path, data):
        write(path, data)
        if path.parent.name == ".checkpoint.tmp" and ROUND == 2:
            die()
    ckpt._write = killing_write

if sys.argv[1] == "save":  # save rounds 1 and 2 of a tiny checkpoint in sys.argv[2]
    import numpy as np
    from fedtrust.server.checkpoint import Checkpoint, save_checkpoint
    for ROUND in (1, 2):
        arrays = {"w": np.full(4, float(ROUND), np.float32)}
        state = {"adam": {"m": np.full(2, -float(ROUND))}}
        save_checkpoint(Path(sys.argv[2]), Checkpoint(ROUND, arrays, state, {}, {"round": ROUND}))
else:
    from fedtrust.simulations.cli import main
    sys.argv = ["fedtrust", *sys.argv[1:]]
    main()
"""


def _run(args: list[str], kill_at: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["FEDTRUST_KILL_AT"] = kill_at
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: whatever a killed run leaves, goes
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's helpers of a killed driver, if any
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


# ---------------------------------------------------------------- kills inside save_checkpoint


def _arrays(round_: int) -> dict[str, np.ndarray]:
    return {"w": np.full(4, float(round_), np.float32)}


@pytest.mark.parametrize(
    "kill_at, survives",
    [("in-save-after-first-file", 1), ("between-renames-round-2", 1)],
)
def test_a_save_killed_midway_leaves_the_last_complete_checkpoint(tmp_path, kill_at, survives):
    result = _run(["save", str(tmp_path)], kill_at, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stdout
    names = {p.name for p in tmp_path.iterdir()}
    if kill_at == "between-renames-round-2":  # the old bug: no checkpoint/ -> round 1 again
        assert names == {".checkpoint.old", ".checkpoint.tmp"}
    else:
        assert names == {"checkpoint", ".checkpoint.tmp"}
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == survives
    np.testing.assert_array_equal(loaded.arrays["w"], _arrays(survives)["w"])
    np.testing.assert_array_equal(loaded.strategy_state["adam"]["m"], np.full(2, -1.0))
    assert loaded.metrics == {"round": survives}

    # the resumed run saves its next round over what the kill left: one clean checkpoint
    save_checkpoint(tmp_path, Checkpoint(survives + 1, _arrays(survives + 1)))
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint"}
    assert load_checkpoint(tmp_path).round == survives + 1


def test_a_temporary_checkpoint_is_never_loaded(tmp_path):
    save_checkpoint(tmp_path, Checkpoint(1, _arrays(1)))
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.tmp")  # complete, but unfinished
    assert load_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    "damage, file, message",
    [
        ("truncate", "model.safetensors", "model.safetensors: corrupt checkpoint (truncated"),
        ("truncate", "strategy.safetensors", "strategy.safetensors: corrupt checkpoint"),
        ("garbage", "model.safetensors", "model.safetensors: corrupt checkpoint"),
        ("garbage", "round.json", "round.json: corrupt checkpoint (not valid JSON"),
        ("delete", "model.safetensors", "model.safetensors: corrupt checkpoint (missing)"),
        ("delete", "round.json", "round.json: corrupt checkpoint (missing)"),
    ],
)
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, damage, file, message):
    save_checkpoint(tmp_path, Checkpoint(1, _arrays(1), {"adam": {"m": np.zeros(3)}}))
    path = tmp_path / "checkpoint" / file
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-5])
    elif damage == "garbage":
        size = path.stat().st_size  # the same size: only parsing can tell
        path.write_bytes((b"\x00garbage" * size)[:size])
    else:
        path.unlink()
    with pytest.raises(RunFolderError) as err:
        load_checkpoint(tmp_path)
    assert message in str(err.value)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_metrics_lines_cut_short_by_a_kill_are_dropped_not_fatal(tmp_path):
    rows = [{"round": 0, "loss": 1.0}, {"round": 1, "loss": 0.5}]
    write_metrics(tmp_path, rows)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"round": 2, "lo')  # killed while appending round 2's line
    assert read_metrics(tmp_path) == rows

    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, "lo\n{"round": 2}\n')
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:2: corrupt metrics line"):
        read_metrics(tmp_path)


# ---------------------------------------------------------------- bad --resume folders


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    output = result.output + (repr(result.exception) if result.exit_code not in (0, 2) else "")
    return result.exit_code, " ".join(output.split())


@pytest.fixture
def run_folder(tmp_path, tiny_bert, intent_jsonl) -> Path:
    """A stopped run's folder: its config and round 1's checkpoint."""
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    write_config(run_dir, tiny_run_config(tmp_path, tiny_bert, intent_jsonl, "stopped"))
    save_checkpoint(run_dir, Checkpoint(1, _arrays(1), metrics={"round": 1}))
    return run_dir


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "stopped: no such run folder"),
        ("a-file", "stopped: not a folder"),
        ("no-config", "stopped: not a fedtrust run folder (no config.toml)"),
        ("config-garbage", "config.toml: corrupt run config, not valid TOML"),
        ("config-binary", "config.toml: corrupt run config, not valid TOML"),
        ("config-empty", "config.toml: incomplete run config (no [run], [task] section)"),
        ("config-bad-value", "config.toml: server.rounds"),
        ("checkpoint-truncated", "model.safetensors: corrupt checkpoint (truncated"),
    ],
)
def test_a_bad_resume_folder_is_one_line_naming_the_path(run_folder, damage, message):
    config = run_folder / "config.toml"
    if damage == "missing":
        run_folder.rename(run_folder.with_name("elsewhere"))
    elif damage == "a-file":
        run_folder.rename(run_folder.with_name("elsewhere"))
        run_folder.write_text("not a folder")
    elif damage == "no-config":
        config.unlink()
    elif damage == "config-garbage":
        config.write_text(config.read_text()[:-40] + "\n[task\n")
    elif damage == "config-binary":
        config.write_bytes(b"\xff\xfe\x00\x81" * 20)
    elif damage == "config-empty":
        config.write_text("")
    elif damage == "config-bad-value":
        config.write_text(re.sub(r"\nrounds = \d+", "\nrounds = -3", config.read_text()))
    else:
        model = run_folder / "checkpoint" / "model.safetensors"
        model.write_bytes(model.read_bytes()[:-10])
    code, output = _cli("simulate", "--resume", str(run_folder))
    assert code == 2, output
    assert message in output
    assert str(run_folder) in output
    assert "Traceback" not in output


# ---------------------------------------------------------------- real kills, real resumes

SETTINGS = {  # fedadam + activity + continual: server-optimizer state and a device schedule
    "partition.num_devices": 12,
    "selection.devices_per_round": 3,
    "selection.strategy": "activity",
    "devices.mode": "continual",
    "devices.capacity": 8,
    "server.aggregation": "fedadam",
    "server.server_lr": 0.01,
    "server.rounds": 3,
    "client.steps": 4,
    "client.batch_size": 8,
}


@pytest.fixture(scope="module")
def base_config(tmp_path_factory, tiny_bert, intent_jsonl) -> Path:
    out = tmp_path_factory.mktemp("crash-runs")
    settings = [f"{k}={json.dumps(v)}" for k, v in SETTINGS.items()]
    cfg = tiny_run_config(out, tiny_bert, intent_jsonl, "unused", *settings)
    path = out / "base.toml"
    path.write_text(tomli_w.dumps(cfg.to_dict()))
    return path


def _simulate(base: Path, name: str, kill_at: str = "") -> subprocess.CompletedProcess:
    return _run(["simulate", "--config", str(base), "--set", f'run.name="{name}"'], kill_at)


@pytest.fixture(scope="module")
def reference(base_config) -> Path:
    """One uninterrupted run, shared by every kill test."""
    result = _simulate(base_config, "whole")
    assert result.returncode == 0, result.stdout[-3000:]
    return base_config.parent / "whole"


def _same_run(a: Path, b: Path) -> None:
    """Bitwise the same final model (and checkpoint, metrics, final metrics)."""
    for name in ("model/model.safetensors", "checkpoint/model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}: {key}")
    state_a, state_b = load_checkpoint(a).strategy_state, load_checkpoint(b).strategy_state
    assert state_a.keys() == state_b.keys() and state_a  # FedAdam's moments
    for part, tensors in state_a.items():
        assert tensors.keys() == state_b[part].keys()
        for key, value in tensors.items():
            np.testing.assert_array_equal(value, state_b[part][key], err_msg=f"{part}/{key}")

    def rows(run: Path) -> list[dict]:
        # timings, and the downlink's bytes: every message names the run folder (the devices'
        # storage), whose path differs between the two runs
        timings = ("seconds", "phases", "downlink_bytes")
        return [{k: v for k, v in r.items() if k not in timings} for r in read_metrics(run)]

    assert rows(a) == rows(b)
    assert [r["round"] for r in rows(b)] == [0, 1, 2, 3]
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert summary_a["final"] == summary_b["final"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at, left",
    [
        ("aggregate-round-2", {"checkpoint": 1}),
        ("between-renames-round-2", {".checkpoint.old": 1}),
        ("final-evaluation", {"checkpoint": 3}),
    ],
)
def test_killed_anywhere_then_resumed_gives_the_same_model(base_config, reference, kill_at, left):
    name = kill_at.split("-")[0]
    killed = _simulate(base_config, name, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    run_dir = base_config.parent / name
    ((folder, done),) = left.items()
    assert json.loads((run_dir / folder / "round.json").read_text())["round"] == done
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model").exists()
    kept = [r for r in read_metrics(run_dir) if r["round"] <= done]
    assert [r["round"] for r in kept] == list(range(done + 1))

    resumed = _run(["simulate", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Traceback" not in resumed.stdout
    assert {p.name for p in run_dir.iterdir()} >= {"checkpoint", "summary.json", "model"}
    assert not (run_dir / ".checkpoint.old").exists()
    # it went on after round `done` (a run started over would time its rounds anew) ...
    assert read_metrics(run_dir)[: done + 1] == kept
    # ... and ended where the uninterrupted run did, bit for bit
    _same_run(reference, run_dir)
