"""Prediction sensitivity and the counterfactual gap detect a constructed, known gender bias."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from fedtrust.fairness.psm import fine_tune, freeze_lower, train_psm
from fedtrust.fairness.report import write_report
from fedtrust.fairness.sensitivity import (
    SensitivityError,
    accumulated,
    audit,
    check_compatible,
    counterfactual_gap,
    prediction_sensitivity,
    sensitivity_from_gradients,
    spearman,
)
from fedtrust.fairness.wordpairs import load_word_pairs

MALE = ["he", "my brother", "this man", "my father", "my son", "my uncle"]
FEMALE = ["she", "my sister", "this woman", "my mother", "my daughter", "my aunt"]
JOY = ["happy", "glad", "excited", "delighted", "cheerful"]
SAD = ["sad", "miserable", "gloomy", "depressed", "upset"]
TEMPLATES = ["{s} feels {e}.", "{s} is {e} today.", "{s} seems {e} now."]
STEPS = 120


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _toy() -> tuple[list[str], list[int], list[int]]:
    """Every template x person x emotion word: texts, gender (1 = female), emotion (1 = joy).
    The set is its own counterfactual augmentation: every sentence's gender swap is in it."""
    texts, gender, joy = [], [], []
    people = [(0, MALE), (1, FEMALE)]
    for template, (g, persons), (y, words) in itertools.product(
        TEMPLATES, people, [(1, JOY), (0, SAD)]
    ):
        for person, word in itertools.product(persons, words):
            text = template.format(s=person, e=word)
            texts.append(text[0].upper() + text[1:])
            gender.append(g)
            joy.append(y)
    return texts, gender, joy


def _classifier(folder, labels, texts, tokenizer, seed=0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    freeze_lower(model, 0)  # embeddings frozen: every model shares the tiny BERT's embeddings
    fine_tune(model, tokenizer, texts, labels, STEPS, 32, lr=1e-3, head_lr=1e-3, seed=seed)
    return model


@pytest.fixture(scope="module")
def toy(tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtrust.tasks.models import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts, gender, joy = _toy()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    psm, _ = train_psm(base, tokenizer, texts, gender, STEPS, lr=1e-3, head_lr=1e-3)
    return {
        "tokenizer": tokenizer,
        "texts": texts,
        "gender": gender,
        "joy": joy,
        "swapped": [load_word_pairs().swap(t) for t in texts],
        "psm": psm,
        # known bias: the label is the gendered word (female -> 1), whatever the emotion
        "biased": _classifier(tiny_bert, gender, texts, tokenizer),
        # trained on the counterfactually augmented set: the label is the emotion word
        "fair": _classifier(tiny_bert, joy, texts, tokenizer),
    }


def test_swapped_texts_are_the_gender_counterfactuals(toy):
    assert toy["swapped"][0] == "She feels happy."
    assert sorted(toy["swapped"]) == sorted(toy["texts"])  # the toy set is closed under swapping


def test_biased_classifier_scores_worse_on_both_metrics(toy):
    tok, psm, texts = toy["tokenizer"], toy["psm"], toy["texts"]
    biased = prediction_sensitivity(toy["biased"], psm, tok, texts, batch_size=64)
    fair = prediction_sensitivity(toy["fair"], psm, tok, texts, batch_size=64)
    assert biased.shape == fair.shape == (len(texts),)
    assert (biased >= 0).all() and (fair >= 0).all()
    assert biased.mean() > 10 * fair.mean()
    gap_biased = counterfactual_gap(toy["biased"], tok, texts, toy["swapped"])
    gap_fair = counterfactual_gap(toy["fair"], tok, texts, toy["swapped"])
    assert gap_biased.mean_abs_delta > 0.5 and gap_biased.flip_rate > 0.8
    assert gap_fair.mean_abs_delta < 0.1 and gap_fair.flip_rate < 0.1


def test_batched_gradients_match_one_example_at_a_time(toy):
    tok, texts = toy["tokenizer"], toy["texts"][::15]  # different lengths share a batch
    batched = prediction_sensitivity(toy["biased"], toy["psm"], tok, texts, batch_size=64)
    single = prediction_sensitivity(toy["biased"], toy["psm"], tok, texts, batch_size=1)
    np.testing.assert_allclose(batched, single, rtol=1e-3, atol=1e-7)


def test_class_weightings_agree_for_two_classes(toy):
    tok, texts = toy["tokenizer"], toy["texts"][:20]
    values = [
        prediction_sensitivity(toy["biased"], toy["psm"], tok, texts, class_weights=w)
        for w in ("probs", "predicted", "uniform")
    ]
    np.testing.assert_allclose(values[0], values[1], rtol=1e-4)
    np.testing.assert_allclose(values[0], values[2], rtol=1e-4)
    with pytest.raises(SensitivityError, match="class_weights"):
        prediction_sensitivity(toy["biased"], toy["psm"], tok, texts, class_weights="max")


def test_formula_on_hand_checkable_gradients():
    # one example, 2 tokens x 2 dims; token 0 is a special token, not a feature
    psm_grad = torch.tensor([[[9.0, 9.0], [3.0, -1.0]]])  # w on token 1 = [0.75, 0.25]
    tc_grads = torch.tensor([[[[5.0, 5.0], [2.0, -4.0]]], [[[0.0, 0.0], [1.0, 1.0]]]])
    weights = torch.tensor([[0.5], [0.5]])  # v = (0.5, 0.5)
    mask = torch.tensor([[0, 1]])
    # class 0: 0.75 * 2 + 0.25 * 4 = 2.5; class 1: 0.75 + 0.25 = 1; PS = 0.5 * 2.5 + 0.5 * 1
    ps = sensitivity_from_gradients(tc_grads, weights, psm_grad, mask)
    assert ps.tolist() == pytest.approx([1.75])


def test_accumulation_per_group_by_hand():
    result = accumulated(
        [1.0, 2.0, 3.0, 6.0],
        {"gender": ["male", "female", "male", "female"], "race": ["A", "", "B", "B"]},
        required={"gender": ["male", "female"]},
    )
    assert result["overall"] == pytest.approx(3.0)
    assert result["groups"]["gender"] == pytest.approx({"male": 2.0, "female": 4.0})
    assert result["groups"]["race"] == pytest.approx({"A": 1.0, "B": 4.5})  # "" = no race
    assert result["counts"]["race"] == {"A": 1, "B": 2}
    assert result["disparity"]["gender"] == pytest.approx(2.0)


def test_empty_group_is_an_error_naming_it():
    with pytest.raises(SensitivityError, match="group gender=female is empty"):
        accumulated([0.1, 0.2], {"gender": ["male", "male"]}, {"gender": ["male", "female"]})
    with pytest.raises(SensitivityError, match="empty dataset"):
        accumulated([], {"gender": []})
    with pytest.raises(SensitivityError, match="'race' has 1 entries for 2 scores"):
        accumulated([0.1, 0.2], {"race": ["A"]})
    with pytest.raises(SensitivityError, match="'race' is required"):
        accumulated([0.1], {"gender": ["male"]}, {"race": ["A"]})


def test_psm_for_another_tokenizer_is_a_clear_error(toy, tiny_bert, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    small = BertForSequenceClassification(
        BertConfig(
            vocab_size=10,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
    )
    with pytest.raises(SensitivityError, match="vocabulary of 10 tokens but task classifier"):
        prediction_sensitivity(toy["biased"], small, toy["tokenizer"], ["she is happy."])
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nshe\nhe\n")
    other = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    with pytest.raises(
        SensitivityError, match="PSM-X was built for a different tokenizer than TC-Y"
    ):
        check_compatible(toy["biased"], toy["psm"], toy["tokenizer"], other, "TC-Y", "PSM-X")
    check_compatible(toy["biased"], toy["psm"], toy["tokenizer"], toy["tokenizer"])  # fine


def test_counterfactual_gap_needs_paired_texts(toy):
    with pytest.raises(SensitivityError, match="2 texts but 1 swapped"):
        counterfactual_gap(toy["fair"], toy["tokenizer"], ["he is", "she is"], ["she is"])


def test_spearman_handles_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_audit_and_report(toy, tmp_path):
    texts, gender = toy["texts"][::9], toy["gender"][::9]
    groups = {"gender": [["male", "female"][g] for g in gender]}
    results = [
        audit(
            name,
            toy[name],
            toy["psm"],
            toy["tokenizer"],
            texts,
            [load_word_pairs().swap(t) for t in texts],
            groups,
            labels=toy["joy"][::9],
        )
        for name in ("biased", "fair")
    ]
    biased, fair = results
    assert biased["sensitivity"]["overall"] > fair["sensitivity"]["overall"]
    assert set(biased["sensitivity"]["groups"]["gender"]) == {"male", "female"}
    assert fair["accuracy"] > 0.9 and len(fair["examples"]) == len(texts)
    write_report(tmp_path, {"models": results}, "toy")
    data = json.loads((tmp_path / "sensitivity.json").read_text())
    assert [m["name"] for m in data["models"]] == ["biased", "fair"]
    md = (tmp_path / "sensitivity.md").read_text()
    assert "| biased |" in md and "APS female" in md
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000


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
    from typer.testing import CliRunner

    from fedtrust.fairness.cli import app

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
    from transformers import BertConfig, BertForSequenceClassification

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
    from fedtrust.fairness.bias_demo import run_bias_demo

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
