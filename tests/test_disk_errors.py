"""Disk trouble is one line, early, and loses nothing: an output folder that cannot be written
stops a run before training, a checkpoint that cannot be written keeps the last good one, and a
run that fails validation leaves no folder behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import tiny_run_config
from typer.testing import CliRunner

import fedtrust.server.checkpoint as checkpoint_module
from fedtrust.errors import ConfigError, DataError, FederationError, RunFolderError
from fedtrust.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtrust.simulations.cli import app
from fedtrust.simulations.runner import start_run


def _full_disk(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _round(r: int) -> Checkpoint:
    return Checkpoint(
        r,
        {"w": np.full(5, float(r), np.float32)},
        {"adam": {"m": np.full(3, -float(r))}},
        {"0": {"epsilon": 0.1 * r}},
        {"round": r, "accuracy": 0.5},
    )


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fails_at", ["write", "fsync", "rename"])
def test_a_checkpoint_that_cannot_be_written_keeps_the_last_good_one(
    tmp_path, monkeypatch, fails_at
):
    save_checkpoint(tmp_path, _round(1))
    if fails_at == "write":  # the disk fills up halfway through the second file
        write = checkpoint_module._write

        def half_write(path, data):
            if path.name == "strategy.safetensors":
                path.write_bytes(data[: len(data) // 2])
                raise _full_disk(path)
            write(path, data)

        monkeypatch.setattr(checkpoint_module, "_write", half_write)
        failed = tmp_path / ".checkpoint.tmp" / "strategy.safetensors"
    elif fails_at == "fsync":  # delayed allocation: the error shows when the data is flushed
        fsync, calls = os.fsync, []

        def full_fsync(fd):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fsync(fd)

        monkeypatch.setattr(checkpoint_module.os, "fsync", full_fsync)
        failed = tmp_path / ".checkpoint.tmp" / "strategy.safetensors"
    else:  # the old checkpoint moved aside, then the new one cannot be moved in
        rename = Path.rename

        def failing_rename(self, target):
            if self.name == ".checkpoint.tmp":
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(self), str(target))
            return rename(self, target)

        monkeypatch.setattr(Path, "rename", failing_rename)
        failed = tmp_path / ".checkpoint.tmp"

    with pytest.raises(FederationError) as err:
        save_checkpoint(tmp_path, _round(2))
    message = str(err.value)
    assert message.startswith(f"{failed}: cannot write the checkpoint of round 2 (")
    assert ("Input/output error" if fails_at == "rename" else "No space left") in message
    assert f"--resume {tmp_path}" in message and "\n" not in message
    assert not (tmp_path / ".checkpoint.tmp").exists()  # the half-written one is gone

    kept = load_checkpoint(tmp_path)  # round 1, whole
    assert kept is not None and kept.round == 1
    np.testing.assert_array_equal(kept.arrays["w"], np.full(5, 1.0, np.float32))
    np.testing.assert_array_equal(kept.strategy_state["adam"]["m"], np.full(3, -1.0))
    assert kept.device_privacy == {"0": {"epsilon": 0.1}}

    monkeypatch.undo()  # space freed: the next save goes through
    save_checkpoint(tmp_path, _round(2))
    assert load_checkpoint(tmp_path).round == 2
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint"}


# ---------------------------------------------------------------- the output folder


@pytest.fixture
def cfg(tmp_path, tiny_bert, intent_jsonl):
    return tiny_run_config(
        tmp_path / "runs" / "nested",
        tiny_bert,
        intent_jsonl,
        "run",
        "partition.num_devices=4",
        "selection.devices_per_round=2",
    )


def test_an_output_dir_below_a_file_is_one_line_before_training(tmp_path, cfg):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg.run.output_dir = str(blocker / "runs")
    with pytest.raises(ConfigError) as err:
        start_run(cfg)
    assert str(blocker / "runs") in str(err.value)
    assert "cannot write the run folder" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_read_only_output_dir_is_one_line_before_training(tmp_path, cfg):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:
            (folder / "probe").write_text("")
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes into read-only folders (root): see the EROFS test")
        cfg.run.output_dir = str(folder)
        with pytest.raises(ConfigError, match="Permission denied") as err:
            start_run(cfg)
        assert f"{folder / 'run'}: cannot write the run folder" in str(err.value)
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_an_unwritable_run_folder_is_one_line_and_removed_again(tmp_path, cfg, monkeypatch):
    """A read-only file system (as any user, root included): the folders made are taken back."""

    open_ = Path.open

    def read_only(self, *args, **kwargs):
        if tmp_path not in self.parents:
            return open_(self, *args, **kwargs)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "open", read_only)  # mkdir works, writing config.toml does not
    with pytest.raises(ConfigError) as err:
        start_run(cfg)
    monkeypatch.undo()
    assert "Read-only file system" in str(err.value)
    assert str(tmp_path / "runs" / "nested" / "run") in str(err.value)
    assert not (tmp_path / "runs").exists()  # both folders start_run made are gone


def test_resuming_into_an_unwritable_run_folder_is_one_line(tmp_path, cfg, monkeypatch):
    run_dir, _ = start_run(cfg)
    save_checkpoint(run_dir, _round(1))

    write_bytes = Path.write_bytes

    def read_only(self, *args, **kwargs):
        if run_dir not in self.parents:
            return write_bytes(self, *args, **kwargs)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(RunFolderError, match="Read-only file system") as err:
        start_run(cfg, resume=run_dir)
    assert str(err.value).startswith(f"{run_dir}: cannot write to the run folder")


# ---------------------------------------------------------------- failed validation


def test_a_run_that_fails_validation_leaves_no_folder(tmp_path, cfg):
    cfg.partition.scheme = "natural"  # 10 users in the data: known only once it is read
    cfg.selection.devices_per_round = 12
    with pytest.raises(ConfigError, match="larger than the population"):
        start_run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_bad_data_leaves_no_folder(tmp_path, cfg):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "hi", "label": "a"}\n{oops}\n')
    cfg.task.dataset = str(data)
    with pytest.raises(DataError, match="broken.jsonl:2"):
        start_run(cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["broken.jsonl"]


def test_the_cli_leaves_no_folder_for_a_run_it_refuses(tmp_path, tiny_bert, intent_jsonl):
    args = [
        "simulate",
        "--set",
        f'task.dataset="{intent_jsonl}"',
        "--set",
        f'task.model="{tiny_bert}"',
        "--set",
        "partition.scheme=natural",
        "--set",
        "selection.devices_per_round=11",
        "--set",
        f'run.output_dir="{tmp_path / "runs"}"',
    ]
    result = CliRunner().invoke(app, args)
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "selection.devices_per_round: 11 is larger than the population (10 devices)" in output
    assert "Traceback" not in output
    assert not (tmp_path / "runs").exists()
