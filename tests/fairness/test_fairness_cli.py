"""`fedtrust fairness sensitivity` and `bias-demo`: reports, one-line errors, the bias demo."""

from __future__ import annotations

import json

import pytest
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from fedtrust.simulations.fairness_cli import app
from fedtrust.simulations.fairness_runs import run_bias_demo


@pytest.fixture(scope="module")
def saved(toy, tmp_path_factory):
    """A fedtrust-style run folder (run/model/) with the biased classifier, and a PSM folder."""
    root = tmp_path_factory.mktemp("saved")
    for name, folder in (("biased", root / "run" / "model"), ("psm", root / "psm")):
        toy[name].save_pretrained(folder)
        toy["tokenizer"].save_pretrained(folder)
    (root / "run" / "config.toml").write_text('[task]\nmodel = "minilm"\n')
    return root


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def test_cli_sensitivity_writes_a_report(saved, tmp_path):
    code, output = _cli(
        "sensitivity",
        "--model",
        saved / "run",
        "--psm",
        saved / "psm",
        "--out",
        tmp_path / "report",
        "--examples",
        60,
    )
    assert code == 0, output
    assert "APS =" in output and "report in" in output
    data = json.loads((tmp_path / "report" / "sensitivity.json").read_text())
    (model,) = data["models"]
    assert model["examples_measured"] == 60
    assert set(model["sensitivity"]["groups"]["gender"]) == {"male", "female"}
    assert set(model["sensitivity"]["groups"]["race"]) == {"African-American", "European"}
    assert (tmp_path / "report" / "sensitivity.png").is_file()


def test_cli_trains_a_psm_when_none_is_given(saved, tmp_path):
    code, output = _cli(
        "sensitivity",
        "--model",
        saved / "run" / "model",
        "--out",
        tmp_path,
        "--examples",
        30,
        "--psm-steps",
        5,
    )
    assert code == 0, output
    assert (tmp_path / "psm" / "config.json").is_file()
    assert "gender_accuracy" in json.loads((tmp_path / "sensitivity.json").read_text())["psm"]


def test_cli_bad_input_is_one_clear_line(toy, saved, tiny_bert, tmp_path):
    code, output = _cli("sensitivity", "--model", tmp_path)
    assert code == 2 and f"error: {tmp_path}: no model (expected model/config.json" in output
    code, output = _cli("sensitivity", "--model", tiny_bert, "--psm", saved / "psm")
    assert code == 2 and "is a BertModel, not a sequence classifier" in output
    code, output = _cli(
        "sensitivity", "--model", saved / "run", "--psm", saved / "psm", "--examples", 3
    )
    assert code == 2 and "is empty: no example of it among 3" in output
    # a PSM built for another vocabulary
    other = tmp_path / "other-psm"
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertForSequenceClassification(config).save_pretrained(other)
    toy["tokenizer"].save_pretrained(other)
    code, output = _cli("sensitivity", "--model", saved / "run", "--psm", other)
    assert code == 2, output
    assert f"{other} has a vocabulary of 50 tokens but {saved / 'run' / 'model'}" in output
    assert "Traceback" not in output


def test_bias_demo_biased_training_scores_worse(tiny_bert):
    result = run_bias_demo(
        str(tiny_bert),
        steps=100,
        psm_steps=100,
        freeze_layers=0,
        lr=1e-3,
        head_lr=1e-3,
        test_examples=100,
    )
    data = result["data"]
    assert data["biased"]["joy_share_female"] > 0.8 > 0.2 > data["biased"]["not_joy_share_female"]
    assert data["augmented"]["joy_share_female"] == 0.5
    biased, augmented = result["models"]
    assert (biased["name"], augmented["name"]) == ("biased", "augmented")
    assert biased["sensitivity"]["overall"] > 2 * augmented["sensitivity"]["overall"]
    assert (
        biased["counterfactual"]["mean_abs_delta"]
        > 2 * augmented["counterfactual"]["mean_abs_delta"]
    )


def test_cli_bias_demo(tiny_bert, tmp_path):
    code, output = _cli(
        "bias-demo",
        "--model",
        tiny_bert,
        "--out",
        tmp_path,
        "--steps",
        5,
        "--psm-steps",
        5,
        "--freeze-layers",
        0,
    )
    assert code == 0, output
    assert "biased: accuracy" in output and "augmented: accuracy" in output
    md = (tmp_path / "sensitivity.md").read_text()
    assert "| biased |" in md and "| augmented |" in md
    code, output = _cli("bias-demo", "--model", tiny_bert, "--correlation", 0.2)
    assert code == 2 and "correlation must be in [0.5, 1], got 0.2" in output


def test_cli_bad_options_and_missing_encoder_are_one_line(saved, tmp_path):
    code, output = _cli("sensitivity", "--model", saved / "run", "--examples", 0)
    assert code == 2 and "error: --examples must be at least 1, got 0" in output
    code, output = _cli("bias-demo", "--threads", 0)
    assert code == 2 and "error: --threads must be at least 1, got 0" in output
    code, output = _cli("bias-demo", "--model", tmp_path / "nothing", "--out", tmp_path / "r")
    assert code == 2 and output.startswith("error:") and "Traceback" not in output
