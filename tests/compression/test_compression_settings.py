"""CompressionSettings: every bad value is a one-line ConfigError naming field and value."""

from __future__ import annotations

import math

import pytest

from fedtrust.compression import METHODS, CompressionSettings, HashedSubspace
from fedtrust.errors import ConfigError


@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_defaults_checks(method):
    settings = CompressionSettings(method=method)
    assert settings.check() is settings


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "gzip"),
        ("method", 3),
        ("density", 0.0),
        ("density", 1.5),
        ("density", -0.1),
        ("density", math.nan),
        ("density", "0.1"),
        ("buckets", -1),
        ("buckets", 2.5),
        ("bits", 17),
        ("bits", -1),
        ("bits", True),
        ("error_feedback", "yes"),
        ("prune_until", 0.0),
        ("prune_until", 1.25),
        ("prune_events", 0),
    ],
)
def test_a_bad_value_names_its_field_and_value(field, value):
    with pytest.raises(ConfigError) as error:
        CompressionSettings(**{field: value}).check()
    message = str(error.value)
    assert f"compression.{field}" in message
    assert repr(value) in message
    assert "\n" not in message


def test_an_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        CompressionSettings(method="zip").check()
    assert all(method in str(error.value) for method in METHODS)


def test_negative_buckets_say_below_one():
    with pytest.raises(ConfigError, match="< 1"):
        CompressionSettings(method="hashed-diff", buckets=-5).check()


@pytest.mark.parametrize(
    ("method", "bits", "expected"),
    [("quantize", 0, 8), ("quantize", 3, 3), ("topk", 0, 0), ("topk", 8, 8), ("none", 4, 0)],
)
def test_effective_bits(method, bits, expected):
    assert CompressionSettings(method=method, bits=bits).effective_bits == expected


def test_bucket_count_is_derived_from_density_and_must_be_at_least_one():
    settings = CompressionSettings(method="hashed-diff", density=0.01)
    assert settings.bucket_count(12_345) == round(0.01 * 12_345)
    assert CompressionSettings(method="hashed-diff", buckets=77).bucket_count(12_345) == 77
    with pytest.raises(ConfigError, match="compression.density"):
        settings.bucket_count(20)


def test_keep_count_is_at_least_one_and_at_most_all():
    assert CompressionSettings(density=0.01).keep_count(10) == 1
    assert CompressionSettings(density=1.0).keep_count(10) == 10
    assert CompressionSettings(density=0.25).keep_count(1000) == 250


def test_fewer_buckets_than_tensors_is_a_config_error():
    shapes = {f"t{i}": (4,) for i in range(5)}
    with pytest.raises(ConfigError, match="compression.buckets: 3"):
        HashedSubspace(shapes, 3, seed=0)
    with pytest.raises(ConfigError, match="compression.buckets: 21"):
        HashedSubspace(shapes, 21, seed=0)


def test_check_shapes_finds_a_bucket_count_the_model_cannot_take():
    shapes = {f"t{i}": (4, 4) for i in range(5)}
    with pytest.raises(ConfigError, match="compression.buckets: 3 is fewer than the 5 tensors"):
        CompressionSettings(method="hashed-diff", buckets=3).check_shapes(shapes)
    with pytest.raises(ConfigError, match="compression.buckets: 81 is more than the 80 entries"):
        CompressionSettings(method="hashed-diff", buckets=81).check_shapes(shapes)
    fine = CompressionSettings(method="hashed-diff", buckets=40)
    assert fine.check_shapes(shapes) is fine
    assert CompressionSettings(method="topk", density=0.001).check_shapes(shapes).method == "topk"
