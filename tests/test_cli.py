"""The command line turns bad input into one-line errors, never a traceback."""

import subprocess
import sys

import pytest


def _run(*args, cwd=None):
    """The CLI in a throw-away folder (a run that fails may leave its run folder behind)."""
    return subprocess.run(
        [sys.executable, "-m", "fedtrust.simulations.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["simulate", "--set", "selection.beta=-1"], "selection.beta: must be >= 0, got -1"),
        (["simulate", "--set", "server.roundz=3"], "unknown key server.roundz"),
        (["simulate", "--config", "nope.toml"], "nope.toml: config file not found"),
        (
            ["simulate", "--set", "partition.num_devices=20000"],
            "num_devices = 20000 is more than the 15100 training examples",
        ),
        (
            ["simulate", "--config", "shakespeare", "--set", "selection.devices_per_round=500"],
            "selection.devices_per_round: 500 is larger than the population (",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = _run(*args, cwd=tmp_path)
    assert result.returncode == 2
    output = " ".join((result.stdout + result.stderr).split())
    assert message in output
    assert "Traceback" not in result.stdout + result.stderr


def test_bad_data_file_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "hi", "label": "a"}\n{oops}\n')
    result = _run("simulate", "--set", f'task.dataset="{path}"', cwd=tmp_path)
    assert result.returncode == 2
    assert "broken.jsonl:2: not valid JSON" in " ".join(result.stdout.split())
