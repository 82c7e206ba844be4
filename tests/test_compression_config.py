"""`[compression]` in a run config: bad values are one line naming where, the key and the value."""

from __future__ import annotations

import pytest
from tiny_runs import tiny_run_config

from fedtrust.clients.settings import TrainInstructions
from fedtrust.errors import ConfigError
from fedtrust.simulations.config import load_config
from fedtrust.simulations.federation import device_instructions
from fedtrust.simulations.runner import simulate


@pytest.mark.parametrize(
    "setting, message",
    [
        ("compression.method='zip'", "compression.method: 'zip' is not one of"),
        ("compression.density=1.5", "compression.density: 1.5 is outside (0, 1]"),
        ("compression.density=0", "compression.density: 0.0 is outside (0, 1]"),
        ("compression.buckets=-3", "compression.buckets: -3 is < 1"),
        ("compression.bits=17", "compression.bits: 17 is outside 1..16"),
        ("compression.bits=-1", "compression.bits: -1 is outside 1..16"),
        ("compression.prune_until=0", "compression.prune_until: 0.0 is outside (0, 1]"),
    ],
)
def test_a_bad_compression_setting_is_one_line_naming_its_source(setting, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [setting])
    text = str(err.value)
    assert text.startswith("--set") and message in text and "\n" not in text


def test_devices_are_told_the_method_and_dense_runs_tell_them_nothing(tmp_path):
    packed = load_config(None, ["compression.method='topk'", "compression.density=0.02"])
    told = TrainInstructions.from_record(device_instructions(packed, tmp_path, 100))
    assert told.compression is not None
    assert (told.compression.method, told.compression.density) == ("topk", 0.02)
    dense = TrainInstructions.from_record(device_instructions(load_config(), tmp_path, 100))
    assert dense.compression is None


def test_too_few_buckets_for_the_model_fail_before_the_run(tmp_path, tiny_bert, intent_jsonl):
    """The bucket count is checked against the model's tensors at start, not in round 1."""
    cfg = tiny_run_config(
        tmp_path,
        tiny_bert,
        intent_jsonl,
        "buckets",
        "compression.method='hashed-diff'",
        "compression.buckets=3",
    )
    with pytest.raises(ConfigError, match=r"compression.buckets: 3 is fewer than the \d+ tensors"):
        simulate(cfg)
    assert not (tmp_path / "buckets").exists()  # no run folder left behind
