import pytest

from fedtrust.simulations.config import ConfigError, load_config, parse_override


def test_defaults_are_the_documented_default_run():
    cfg = load_config()
    assert (cfg.task.dataset, cfg.task.model, cfg.partition.num_devices) == (
        "clinc150",
        "minilm",
        100,
    )
    assert cfg.selection.devices_per_round == 10


def test_file_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[selection]\nstrategy = "activity"\nbeta = 0.5\n[client]\nlr = 1e-3\n')
    cfg = load_config(path, ["client.lr=5e-4", "selection.devices_per_round=4"])
    assert cfg.selection.strategy == "activity" and cfg.selection.beta == 0.5
    assert cfg.client.lr == 5e-4 and cfg.selection.devices_per_round == 4


def test_override_bare_word_is_a_string():
    assert parse_override("selection.strategy=activity") == {"selection": {"strategy": "activity"}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("client.lrr=1", "unknown key client.lrr"),
        ("clients.lr=1", "unknown section [clients]"),
        ("client.epochs=two", "client.epochs: expected an integer, got 'two'"),
        ("client.epochs=1.5", "expected an integer"),
        ("selection.strategy=random", "'random' is not one of 'uniform', 'activity'"),
        ("selection.beta=-0.5", "selection.beta: must be >= 0, got -0.5"),
        ("selection.devices_per_round=101", "larger than the population"),
        ("task.freeze_embeddings=1", "expected true or false"),
        ("lr=1", "the key must be section.key"),
    ],
)
def test_bad_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match="--set") as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_bad_file_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[client]\nlr = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        load_config(tmp_path / "missing.toml")
    path.write_text("[client]\nbatch_size = 0\n")
    with pytest.raises(ConfigError, match="client.batch_size: must be >= 1, got 0"):
        load_config(path)


def test_unbiased_weighting_needs_fedavg():
    with pytest.raises(ConfigError, match="unbiased"):
        load_config(None, ["selection.weighting=unbiased", "server.aggregation=fedadam"])


def test_bundled_default_config_file_matches_the_built_in_defaults():
    assert load_config("clinc150").to_dict() == load_config().to_dict()
