"""Prediction sensitivity and the counterfactual gap detect a constructed, known gender bias."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
)

from fedtrust.errors import FairnessError
from fedtrust.fairness import psm as psm_module
from fedtrust.fairness.psm import copy_encoder, fine_tune
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
from fedtrust.simulations.fairness_report import sensitivity_figure, write_report
from fedtrust.tasks.base import freeze_lower
from fedtrust.tasks.training import make_optimizer


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


def test_psm_for_another_tokenizer_is_a_clear_error(toy, tmp_path):
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
    assert np.isnan(spearman([1.0], [2.0]))


def test_spearman_on_ties_is_pearson_of_average_ranks_and_scipy():
    a = [0.1, 0.5, 0.5, 0.9, 0.2, 0.5]
    b = [3.0, 1.0, 1.0, 2.0, 3.0, 0.0]
    # average ranks (1-based) worked out by hand: the three 0.5s share rank 4, the 3.0s rank 5.5
    ranks_a = [1, 4, 4, 6, 2, 4]
    ranks_b = [5.5, 2.5, 2.5, 4, 5.5, 1]
    by_hand = np.corrcoef(ranks_a, ranks_b)[0, 1]
    assert spearman(a, b) == pytest.approx(by_hand, abs=1e-12)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


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
    assert (tmp_path / "sensitivity.png").is_file()
    # the figure shows the audit: per model, APS overall then per gender; the counterfactual gap
    left, right = sensitivity_figure(results, "toy").axes
    aps_bars, gap_bars = left.containers, right.containers
    assert [c.get_label() for c in aps_bars] == ["biased", "fair"]
    assert [t.get_text() for t in left.get_xticklabels()] == [
        "all",
        "gender=female",
        "gender=male",
    ]
    for result, bars, gaps in zip(results, aps_bars, gap_bars):
        s, cf = result["sensitivity"], result["counterfactual"]
        expected = [s["overall"], s["groups"]["gender"]["female"], s["groups"]["gender"]["male"]]
        assert [b.get_height() for b in bars] == pytest.approx(expected)
        assert [b.get_height() for b in gaps] == pytest.approx(
            [cf["mean_abs_delta"], cf["flip_rate"]]
        )
    with pytest.raises(FairnessError, match="no audited model"):
        write_report(tmp_path, {"models": []}, "empty")


# --------------------------------------------------------------------------- the PSM


def test_copy_encoder_copies_the_whole_base_model_and_makes_a_fresh_head(toy):
    tc = toy["biased"]
    psm = copy_encoder(tc, num_labels=2, seed=1)
    tc_state, psm_state = tc.state_dict(), psm.state_dict()
    base = tc.base_model_prefix
    for key, value in tc_state.items():
        if key.startswith(f"{base}."):  # embeddings, layers and the pooler
            assert torch.equal(psm_state[key], value), key
    assert any(k.startswith(f"{base}.pooler.") for k in tc_state)
    assert not torch.equal(psm_state["classifier.weight"], tc_state["classifier.weight"])
    assert psm.config.id2label == {0: "male", 1: "female"}


def test_fine_tune_trains_head_and_pooler_at_head_lr(tiny_bert, monkeypatch):
    made: list[torch.optim.Optimizer] = []

    def spy(*args, **kwargs):
        made.append(make_optimizer(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(psm_module, "make_optimizer", spy)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    freeze_lower(model, embeddings=True, layers=1)
    head_before = model.classifier.weight.detach().clone()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts, labels = ["he is here.", "she is here."] * 4, [0, 1] * 4
    info = fine_tune(model, tokenizer, texts, labels, steps=3, lr=1e-5, head_lr=1e-2)
    (optimizer,) = made
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr[id(named["classifier.weight"])] == 1e-2
    assert lr[id(named["bert.pooler.dense.weight"])] == 1e-2  # tasks.models.HEAD_PREFIXES
    assert lr[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == 1e-5
    assert id(named["bert.encoder.layer.0.attention.self.query.weight"]) not in lr  # frozen
    assert id(named["bert.embeddings.word_embeddings.weight"]) not in lr
    assert not torch.equal(model.classifier.weight, head_before) and not model.training
    assert np.isfinite(info["train_loss"])
    with pytest.raises(FairnessError, match="one non-zero length"):
        fine_tune(model, tokenizer, ["a"], [0, 1])
