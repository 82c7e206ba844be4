"""Membership inference: attacks and metrics on synthetic scores with known answers, then a
tiny BERT that memorises random labels and the scores the attacks read from it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from privacy_helpers import tiny_bert, tiny_gpt2
from scipy.stats import norm

from fedtrust.errors import DataError
from fedtrust.privacy.attacks.membership import check_disjoint, membership_inference
from fedtrust.privacy.attacks.metrics import attack_metrics, roc_points
from fedtrust.privacy.attacks.mia import (
    lira_offline,
    lira_online,
    loss_attack,
    reference_attack,
)
from fedtrust.privacy.attacks.scores import example_scores
from fedtrust.tasks.intent import IntentTask
from fedtrust.tasks.lm import CharLMTask

# ---------------------------------------------------------------- metrics


def test_metrics_on_a_hand_checked_case():
    # pairs (member, non-member) ranked correctly: 0.9 > 0.8, 0.9 > 0.1, 0.3 > 0.1 -> 3 of 4
    m = attack_metrics(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
    assert m["auc"] == pytest.approx(0.75)
    assert m["advantage"] == pytest.approx(0.5)  # threshold 0.9: TPR 1/2, FPR 0
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.5)
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(0.5)
    assert (m["members"], m["non_members"]) == (2, 2)
    fpr, tpr = roc_points(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]


def test_separable_scores_give_auc_one_and_identical_distributions_chance():
    rng = np.random.default_rng(0)
    member = np.arange(4000) < 2000
    perfect = attack_metrics(rng.normal(size=4000) + 10 * member, member)
    assert perfect["auc"] == 1.0 and perfect["advantage"] == 1.0
    assert perfect["tpr_at_0.1pct_fpr"] == 1.0
    chance = attack_metrics(rng.normal(size=4000), member)
    assert chance["auc"] == pytest.approx(0.5, abs=0.03)
    assert chance["advantage"] < 0.06
    assert chance["tpr_at_1pct_fpr"] < 0.03


def test_low_fpr_tpr_keeps_collinear_roc_points():
    # each score is shared by one member and one non-member: the ROC is the diagonal, whose
    # intermediate points sklearn drops by default; TPR at 1% FPR must still be 1%
    scores = np.repeat(np.arange(200.0), 2)
    member = np.tile([True, False], 200)
    m = attack_metrics(scores, member)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.01)
    assert m["auc"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("scores", "member", "message"),
    [
        ([0.1, 0.2, 0.3], [True, False], "same length"),
        ([0.1, np.nan], [True, False], "NaN"),
        ([0.1, 0.2], [True, True], "both members and non-members"),
        ([0.1, 0.2], [2, 0], "boolean"),
    ],
)
def test_metrics_reject_bad_inputs(scores, member, message):
    with pytest.raises(ValueError, match=message):
        attack_metrics(np.array(scores), np.array(member))


# ---------------------------------------------------------------- attacks


def _difficulty_data(n=2000, shadows=16, margin=1.0, seed=0):
    """Confidences whose per-example mean varies far more than membership shifts it."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 3, size=n)  # how easy each example is
    shadow_in = rng.random((shadows, n)) < 0.5
    shadow_conf = mean + margin * shadow_in + rng.normal(0, 0.5, size=(shadows, n))
    member = rng.random(n) < 0.5
    target_conf = mean + margin * member + rng.normal(0, 0.5, size=n)
    reference_conf = mean + rng.normal(0, 0.5, size=(shadows // 2, n))  # trained on none
    return target_conf, shadow_conf, shadow_in, member, reference_conf


def test_lira_beats_the_loss_attack_when_difficulty_varies():
    target, conf, is_in, member, reference_conf = _difficulty_data()
    loss_auc = attack_metrics(loss_attack(-target), member)["auc"]  # loss falls as conf rises
    online = attack_metrics(lira_online(target, conf, is_in), member)
    offline = attack_metrics(lira_offline(target, conf, is_in), member)
    per_example = attack_metrics(lira_online(target, conf, is_in, fix_variance=False), member)
    # two unit-variance-ish Gaussians 1 / 0.5 apart: AUC = Phi(2 / sqrt 2) ~ 0.92
    assert loss_auc < 0.65
    assert online["auc"] > 0.88 and online["auc"] > loss_auc + 0.2
    assert offline["auc"] > 0.85
    assert per_example["auc"] > 0.85
    assert online["tpr_at_1pct_fpr"] > 0.1 > attack_metrics(-target, member)["tpr_at_1pct_fpr"]
    # reference models trained on none of the examples calibrate difficulty just as well
    ref = reference_attack(-target, -reference_conf)
    assert attack_metrics(ref, member)["auc"] > loss_auc + 0.2


def test_lira_on_a_hand_checked_example():
    # IN shadows 2 and 4, OUT shadows 0 and -2: means 3 and -1, pooled variances 2 and 2
    conf = np.array([[2.0], [4.0], [0.0], [-2.0]])
    is_in = np.array([[True], [True], [False], [False]])
    # log N(3; 3, 2) - log N(3; -1, 2) = (3 + 1)^2 / (2 * 2) = 4
    assert lira_online(np.array([3.0]), conf, is_in) == pytest.approx([4.0])
    expected = -norm.logsf(4 / math.sqrt(2))
    assert lira_offline(np.array([3.0]), conf, is_in) == pytest.approx([expected])
    assert loss_attack(np.array([0.5, 2.0])).tolist() == [-0.5, -2.0]
    ref = reference_attack(np.array([0.5, 2.0]), np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert ref.tolist() == [1.5, 1.0]


def test_lira_falls_back_for_examples_without_in_or_out_shadows():
    target, conf, is_in, _ = _difficulty_data(n=50, shadows=8)[:4]
    is_in[:, 0] = False  # example 0 never IN
    is_in[:, 1] = True  # example 1 never OUT
    for attack in (lira_online, lira_offline):
        for fix in (True, False):
            scores = attack(target, conf, is_in, fix_variance=fix)
            assert scores.shape == (50,) and np.isfinite(scores).all()
    # a never-IN example's mu_in is its mu_out plus the average gap (~ margin 1.0): a target
    # confidence at mu_out + 1 is then more likely IN than OUT
    probe = target.copy()
    probe[0] = conf[:, 0].mean() + 1.0
    assert lira_online(probe, conf, is_in)[0] > 0


def test_attacks_reject_bad_inputs():
    target, conf, is_in, _ = _difficulty_data(n=10, shadows=4)[:4]
    with pytest.raises(ValueError, match=r"shape \(n_models >= 1, 10\)"):
        lira_online(target, conf[:, :5], is_in[:, :5])
    with pytest.raises(ValueError, match="shadow_in has shape"):
        lira_online(target, conf, is_in[:2])
    with pytest.raises(ValueError, match="NaN"):
        lira_online(np.where(np.arange(10) == 3, np.nan, target), conf, is_in)
    with pytest.raises(ValueError, match="NaN"):
        reference_attack(target, np.full((2, 10), np.nan))
    with pytest.raises(ValueError, match="boolean"):
        lira_online(target, conf, is_in * 2)
    with pytest.raises(ValueError, match="at least one OUT shadow confidence; there are 0"):
        lira_online(target, conf, np.ones_like(is_in))
    with pytest.raises(ValueError, match="at least one IN shadow confidence; there are 0"):
        lira_online(target, conf, np.zeros_like(is_in))
    with pytest.raises(ValueError, match="at least one OUT"):
        lira_offline(target, conf, np.ones_like(is_in))
    # 2 shadows, each example IN for one and OUT for the other: no spread can be estimated
    with pytest.raises(ValueError, match="2 shadows"):
        lira_online(target, conf[:2], np.array([[True] * 10, [False] * 10]))
    with pytest.raises(ValueError, match="1-D"):
        loss_attack(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"shape \(n_models >= 1, 10\)"):
        reference_attack(target, target)


def test_overlapping_members_and_non_members_are_refused():
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]
    with pytest.raises(DataError, match="1 non-member rows are identical to member rows"):
        check_disjoint(rows, [{"input_ids": [7]}, {"input_ids": [4, 5]}])
    check_disjoint(rows, [{"input_ids": [1, 2]}])  # a prefix is another text


def test_without_shadows_only_the_loss_attack_runs():
    is_member = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    scores = {"loss": np.r_[np.zeros(50), np.ones(50)], "confidence": np.zeros(100)}
    result = membership_inference(scores, is_member)
    assert list(result) == ["loss"] and result["loss"]["auc"] == 1.0
    fpr, tpr = result["loss"]["roc"]
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_shadows_add_the_reference_and_lira_attacks():
    target, conf, is_in, member, _ = _difficulty_data(n=400, shadows=8)
    shadows = [{"confidence": c, "loss": -c} for c in conf]
    result = membership_inference({"confidence": target, "loss": -target}, member, shadows, is_in)
    assert list(result) == ["loss", "reference", "lira_offline", "lira_online"]
    assert result["lira_online"]["auc"] > result["loss"]["auc"] + 0.2
    assert result["reference"]["auc"] > result["loss"]["auc"] + 0.2


# ---------------------------------------------------------------- scores from real models


def _random_rows(n, vocab, labels, seed):
    g = np.random.default_rng(seed)
    return [
        {
            "input_ids": g.integers(1, vocab, size=int(g.integers(4, 10))).tolist(),
            "labels": int(g.integers(labels)),
        }
        for _ in range(n)
    ]


def _intent_task(train, test, labels):
    return IntentTask(
        kind="intent",
        train=train,
        test=test,
        pad_id=0,
        primary_metric="accuracy",
        labels=tuple(str(i) for i in range(labels)),
    )


def test_example_scores_match_the_model_loss_in_row_order():
    rows = _random_rows(7, vocab=50, labels=3, seed=0)
    task = _intent_task(rows, rows, labels=3)
    model = tiny_bert().double()  # train mode on purpose: scoring must switch to eval and back
    scores = example_scores(model, task, rows, batch_size=3)  # batches mix row order
    assert model.training
    model.eval()
    with torch.no_grad():
        for i, row in enumerate(rows):
            out = model(**task.collate([row]))
            p = float(out.logits.softmax(-1)[0, row["labels"]])
            assert scores["loss"][i] == pytest.approx(float(out.loss), rel=1e-9)
            assert scores["confidence"][i] == pytest.approx(math.log(p) - math.log1p(-p), rel=1e-9)


def test_example_scores_average_the_tokens_of_a_language_model():
    g = np.random.default_rng(0)
    rows = [{"input_ids": g.integers(1, 100, size=n).tolist()} for n in (5, 12, 2, 9)]
    task = CharLMTask(kind="lm", train=rows, test=rows, pad_id=0, primary_metric="accuracy")
    model = tiny_gpt2().double().eval()
    scores = example_scores(model, task, rows, batch_size=4)
    with torch.no_grad():
        for i, row in enumerate(rows):
            batch = task.collate([row])
            out = model(**batch)  # GPT-2 shifts labels itself
            p = out.logits[0, :-1].softmax(-1).gather(-1, batch["labels"][0, 1:, None])
            conf = (p.log() - (1 - p).log()).mean()
            # transformers computes the causal-LM loss in float32
            assert scores["loss"][i] == pytest.approx(float(out.loss), rel=1e-6)
            assert scores["confidence"][i] == pytest.approx(float(conf), rel=1e-9)
    with pytest.raises(ValueError, match="row 1 has no predicted token"):
        example_scores(model, task, [rows[0], {"input_ids": [3]}])
    with pytest.raises(ValueError, match="at least one row"):
        example_scores(model, task, [])


def test_loss_attack_finds_the_members_a_tiny_bert_memorised():
    members = _random_rows(100, vocab=50, labels=10, seed=1)
    held_out = _random_rows(100, vocab=50, labels=10, seed=2)
    task = _intent_task(members, held_out, labels=10)
    is_member = np.arange(200) < 100
    rows = members + held_out

    fresh = tiny_bert(num_labels=10, hidden=32, seed=0)
    untrained = attack_metrics(loss_attack(example_scores(fresh, task, rows)["loss"]), is_member)
    assert untrained["auc"] == pytest.approx(0.5, abs=0.12)

    model = tiny_bert(num_labels=10, hidden=32, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(40):  # random labels: only memorisation lowers the members' loss
        for batch in task.batches(task.train, 25, rng):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    scores = example_scores(model, task, rows)
    assert scores["loss"][:100].mean() < 0.5 * scores["loss"][100:].mean()
    trained = attack_metrics(loss_attack(scores["loss"]), is_member)
    assert trained["auc"] > 0.8
    conf = attack_metrics(scores["confidence"], is_member)  # confidence alone works as well
    assert conf["auc"] > 0.8
