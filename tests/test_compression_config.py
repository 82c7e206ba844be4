"""`[compression]` in a run config: bad values are one line naming where, the key and the value."""

from __future__ import annotations

import pytest

from fedtrust.clients.settings import TrainInstructions
from fedtrust.errors import ConfigError
from fedtrust.simulations.config import load_config
from fedtrust.simulations.federation import device_instructions


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
