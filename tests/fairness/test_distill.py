"""Counterfactual role-reversal distillation: token maps, perturbation, metric, a tiny run."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from fedtrust.errors import ConfigError, FairnessError
from fedtrust.fairness.bold import disparity_report, polarity
from fedtrust.fairness.distill import (
    distillation_loss,
    perturb_log_probs,
    training_stream,
)
from fedtrust.fairness.wordpairs import load_word_pairs
from fedtrust.fairness.wordtokenizer import build_word_tokenizer, counterpart_map
from fedtrust.simulations import distill_train
from fedtrust.simulations.distill import run_distill
from fedtrust.simulations.distill_config import load_distill_config
from fedtrust.simulations.distill_report import tradeoff_figure
from fedtrust.simulations.distill_train import train_lm
from fedtrust.simulations.fairness_cli import app
from fedtrust.tasks.training import make_optimizer

PAIRS = load_word_pairs()
TEXT = (
    "The king said that he works. The queen said that she cooks. His brother and her sister "
    "met the actor and the actress; the lord thanked the lady. The doctor said that he reads."
)


# --------------------------------------------------------------------------- counterpart maps


def test_word_level_counterpart_map_is_an_involution() -> None:
    tokenizer = build_word_tokenizer(TEXT, vocab_size=40, pairs=PAIRS)
    cmap = counterpart_map(tokenizer, PAIRS)
    identity = torch.arange(len(cmap.ids))
    assert torch.equal(cmap.ids[cmap.ids], identity)
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ["he", "she", "king", "queen", "the"]}
    assert int(cmap.ids[ids["he"]]) == ids["she"] and int(cmap.ids[ids["queen"]]) == ids["king"]
    assert int(cmap.ids[ids["the"]]) == ids["the"]
    # every paired word whose counterpart occurs is in the vocabulary, even beyond vocab_size
    assert tokenizer.convert_tokens_to_ids("actress") != tokenizer.unk_token_id
    assert tokenizer.convert_tokens_to_ids("prince") == tokenizer.unk_token_id  # neither occurs
    for a, b in cmap.pairs:
        assert PAIRS.mapping[tokenizer.decode([a])] == tokenizer.decode([b])


def test_token_swap_matches_text_swap_and_twice_is_identity() -> None:
    tokenizer = build_word_tokenizer(TEXT, vocab_size=40, pairs=PAIRS)
    cmap = counterpart_map(tokenizer, PAIRS)
    ids = torch.tensor(tokenizer.encode(TEXT, add_special_tokens=False))
    swapped = cmap.swap_ids(ids)
    assert swapped.tolist() == tokenizer.encode(PAIRS.swap(TEXT), add_special_tokens=False)
    assert torch.equal(cmap.swap_ids(swapped), ids)
    assert PAIRS.swap(PAIRS.swap(TEXT)) == TEXT


def test_bpe_tokenizer_maps_only_single_token_words() -> None:
    rng = random.Random(0)
    words = ["he", "she", "king", "queen", "his", "her", "works", "the", "said", "and"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    cmap = counterpart_map(tokenizer, PAIRS)
    assert torch.equal(cmap.ids[cmap.ids], torch.arange(len(cmap.ids)))
    he, she = (tokenizer.encode(w) for w in (" he", " she"))
    assert len(he) == len(she) == 1 and int(cmap.ids[he[0]]) == she[0]
    assert len(tokenizer.encode(" waitress")) > 1  # unseen: several tokens, so left unmapped
    for a, b in cmap.pairs:
        assert PAIRS.mapping[tokenizer.decode([a]).strip().lower()] == (
            tokenizer.decode([b]).strip().lower()
        )


# --------------------------------------------------------------------------- perturbation


# vocabulary: he, she, works, cooks, the; he <-> she
COUNTERPARTS = torch.tensor([1, 0, 2, 3, 4])
P = torch.tensor([0.5, 0.1, 0.2, 0.1, 0.1])  # teacher on the context x
P_CF = torch.tensor([0.2, 0.4, 0.1, 0.2, 0.1])  # teacher on the swapped context x'
# role-reversed view q(v) = p(c(v) | x') = [0.4, 0.2, 0.1, 0.2, 0.1]


@pytest.mark.parametrize(
    ("variant", "scope", "expected"),
    [
        ("max", "all", [0.5 / 1.2, 0.2 / 1.2, 0.2 / 1.2, 0.2 / 1.2, 0.1 / 1.2]),
        ("mean", "all", [0.45, 0.15, 0.15, 0.15, 0.10]),
        ("swap", "all", [0.4, 0.2, 0.1, 0.2, 0.1]),
        ("max", "gendered", [0.5 / 1.1, 0.2 / 1.1, 0.2 / 1.1, 0.1 / 1.1, 0.1 / 1.1]),
        ("mean", "gendered", [0.45, 0.15, 0.2, 0.1, 0.1]),
    ],
)
def test_perturbation_on_a_hand_checked_distribution(
    variant: str, scope: str, expected: list[float]
) -> None:
    out = perturb_log_probs(P.log(), P_CF.log(), COUNTERPARTS, variant, scope).exp()
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)


def test_geomean_and_gender_neutral_context() -> None:
    geo = perturb_log_probs(P.log(), P_CF.log(), COUNTERPARTS, "geomean").exp()
    raw = torch.sqrt(P * torch.tensor([0.4, 0.2, 0.1, 0.2, 0.1]))
    assert torch.allclose(geo, raw / raw.sum(), atol=1e-6)
    # x' = x (no gendered word in the context): every variant gives he and she equal mass
    for variant in ("max", "mean", "geomean"):
        out = perturb_log_probs(P.log(), P.log(), COUNTERPARTS, variant).exp()
        assert math.isclose(float(out[0]), float(out[1]), rel_tol=1e-6)
    mean = perturb_log_probs(P.log(), P.log(), COUNTERPARTS, "mean").exp()
    assert torch.allclose(mean, torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1]), atol=1e-6)


def test_distillation_loss_is_zero_when_student_matches_teacher() -> None:
    logits = torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    teacher = torch.log_softmax(logits / 2.0, dim=-1)
    loss, parts = distillation_loss(logits, teacher, labels, 2.0, kd_weight=1.0, lm_weight=0.0)
    assert abs(parts["kd"]) < 1e-5 and abs(float(loss)) < 1e-5


def test_training_stream_per_variant() -> None:
    train, swapped = torch.arange(4), torch.arange(10, 13)
    assert torch.equal(training_stream(train, swapped, "plain"), train)
    assert torch.equal(training_stream(train, swapped, "perturb"), train)
    both = torch.cat([train, swapped])
    assert torch.equal(training_stream(train, swapped, "cda+perturb", "two-sided"), both)
    assert torch.equal(training_stream(train, swapped, "cda", "one-sided"), swapped)
    with pytest.raises(FairnessError, match="unknown variant 'fair'"):
        training_stream(train, swapped, "fair")
    with pytest.raises(FairnessError, match="unknown perturbation 'median'"):
        perturb_log_probs(P.log(), P_CF.log(), COUNTERPARTS, "median")


def test_train_lm_warms_up_decays_to_a_tenth_and_clips(monkeypatch) -> None:
    made: list[torch.optim.Optimizer] = []
    norms: list[float] = []

    def spy(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(record_norm)  # runs after the step: clipped gradients
        made.append(optimizer)
        return optimizer

    def record_norm(optimizer, *_):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        norms.append(float(torch.stack([g.norm() for g in grads]).norm()))

    monkeypatch.setattr(distill_train, "make_optimizer", spy)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    lrs: list[float] = []

    def step_loss(batch):
        lrs.append(made[0].param_groups[0]["lr"])
        return 1000 * model(batch["input_ids"]).sum(), {"part": 1.0}

    steps, lr = 40, 0.1
    batches = [{"input_ids": torch.ones(2, 4)}] * steps
    out = io.StringIO()
    info = train_lm(model, batches, step_loss, steps, lr, Console(file=out), "toy")
    warmup = steps // 20
    expected = [
        lr * s / warmup
        if s < warmup
        else lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
        for s in range(steps)
    ]
    assert lrs == pytest.approx(expected)
    assert made[0].param_groups[0]["weight_decay"] == 0.01
    assert len(norms) == steps and max(norms) == pytest.approx(1.0, rel=1e-4)  # clipped to 1
    assert info["steps"] == steps and set(info["final"]) == {"loss", "part"}
    assert not model.training
    log = [line for line in out.getvalue().splitlines() if line.strip()]
    assert [line.split()[2] for line in log] == ["8/40", "16/40", "24/40", "32/40", "40/40"]


# --------------------------------------------------------------------------- the metric


def test_disparity_metric_on_known_generations() -> None:
    assert polarity("he said his", PAIRS)[0] == 1.0
    assert polarity("she and he", PAIRS)[0] == 0.0
    assert polarity("the weather", PAIRS)[0] == 0.0
    male_default = {"American_actors": ["he works"] * 4, "American_actresses": ["he works"] * 4}
    report = disparity_report(male_default, PAIRS)
    assert report["disparity"] == 2.0 and report["bias"] == 2.0 and report["gap"] == 0.0
    assert report["groups"]["American_actresses"]["opposite_share"] == 1.0
    mirrored = {"American_actors": ["he works", "the"], "American_actresses": ["she works", "x"]}
    report = disparity_report(mirrored, PAIRS)
    assert report["disparity"] == 0.0 and report["gap"] == 1.0


# --------------------------------------------------------------------------- configuration


def test_config_errors_name_key_and_value(tmp_path: Path) -> None:
    cases = {
        "distill.temperature=-1": ("distill.temperature", "-1"),
        'distill.variants=["plain", "fair"]': ("distill.variants", "'fair'"),
        'distill.perturb="median"': ("distill.perturb", "'median'"),
        "teacher.layer=2": ("teacher.layer", "unknown key"),
        'bold.per_group="many"': ("bold.per_group", "'many'"),
        'data.corpus="nowhere.txt"': ("data.corpus", "'nowhere.txt'"),
        "student.width=30": ("student.width", "30"),
    }
    for override, (key, value) in cases.items():
        with pytest.raises(ConfigError) as err:
            load_distill_config(None, [override])
        message = str(err.value)
        assert key in message and value in message and "\n" not in message, message
    bad = tmp_path / "bad.toml"
    bad.write_text("[student]\nsteps = 0\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: student\.steps: must be >= 1, got 0"):
        load_distill_config(bad)
    assert load_distill_config("distill").teacher.model == ""  # the bundled demo by name


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def biased_setup(tmp_path_factory) -> Path:
    """A corpus where everyone, actor or actress, is followed by "he"; prompts for both groups."""
    folder = tmp_path_factory.mktemp("biased")
    rng = random.Random(0)
    verbs = ["works", "sings", "reads", "walks", "writes", "plays"]
    lines = [
        f"the {rng.choice(['actor', 'actress', 'doctor', 'person'])} said that he "
        f"{rng.choice(verbs)} ."
        for _ in range(2000)
    ]
    (folder / "corpus.txt").write_text("\n\n".join(lines) + "\n")
    prompts = {
        "American_actors": {f"a{i}": ["The actor said that"] for i in range(4)},
        "American_actresses": {f"b{i}": ["The actress said that"] for i in range(4)},
    }
    (folder / "prompts.json").write_text(json.dumps(prompts))
    (folder / "tiny.toml").write_text(
        f"""
[data]
corpus = "{folder / "corpus.txt"}"
context = 16
vocab_size = 64
eval_tokens = 2000
[teacher]
layers = 2
width = 32
heads = 2
steps = 150
lr = 3e-3
[student]
layers = 1
width = 32
heads = 2
steps = 150
lr = 3e-3
[distill]
variants = ["plain", "cda+perturb"]
[bold]
prompts = "{folder / "prompts.json"}"
per_group = 0
samples_per_prompt = 25
max_new_tokens = 4
[run]
output_dir = "{folder / "runs"}"
name = "tiny"
threads = 1
"""
    )
    return folder


def test_known_bias_is_detected_and_mitigated(biased_setup: Path) -> None:
    run_dir, report = run_distill(biased_setup / "tiny.toml", [])
    models = report["models"]
    teacher, plain, fair = (
        models[k]["bold"] for k in ("teacher", "student-plain", "student-cda+perturb")
    )
    assert teacher["disparity"] > 1.5 and teacher["bias"] > 0  # "he" whatever the prompt
    assert teacher["groups"]["American_actresses"]["opposite_share"] > 0.8
    assert plain["disparity"] > 1.5  # plain distillation keeps the bias
    assert fair["disparity"] < 0.7 and fair["disparity"] < plain["disparity"] - 1.0
    for name in ("distill.json", "distill.md", "distill.png", "teacher/config.json"):
        assert (run_dir / name).is_file(), name
    assert "student-cda+perturb" in (run_dir / "distill.md").read_text()
    assert json.loads((run_dir / "distill.json").read_text())["method"]["perturbation"] == "max"
    # the figure: one point per model at (disparity, perplexity), with the disparity's error bar
    (ax,) = tradeoff_figure(report).axes
    assert [c.get_label() for c in ax.containers] == list(models)
    for container, m in zip(ax.containers, models.values()):
        xs, ys = container.lines[0].get_data()
        assert (list(xs), list(ys)) == ([m["bold"]["disparity"]], [m["perplexity"]])

    # the same run again (from the CLI) reuses the saved teacher
    stamp = (run_dir / "teacher" / "model.safetensors").stat().st_mtime
    code, output = _cli(
        "distill", "--config", biased_setup / "tiny.toml", "--set", 'distill.variants=["plain"]'
    )
    assert code == 0, output
    assert "reusing the teacher" in output
    assert "# Counterfactual role-reversal distillation" in output  # distill.md, printed
    assert output.endswith(f"report in {run_dir} (distill.md, distill.json, distill.png)")
    again = json.loads((run_dir / "distill.json").read_text())
    assert (run_dir / "teacher" / "model.safetensors").stat().st_mtime == stamp
    assert again["models"]["teacher"]["train"] == models["teacher"]["train"]
    assert again["models"]["student-plain"]["perplexity"] == pytest.approx(
        models["student-plain"]["perplexity"]
    )


def test_a_teacher_folder_without_a_model_is_a_config_error(tmp_path):
    missing = tmp_path / "no-teacher-here"
    with pytest.raises(ConfigError, match=r"teacher\.model = .*no-teacher-here.*: no config\.json"):
        run_distill(None, [f"teacher.model='{missing}'", f"run.output_dir='{tmp_path}'"])


def test_cli_config_errors_are_one_line(tmp_path):
    code, output = _cli("distill", "--set", "distill.temperature=-1")
    assert code == 2 and output == "error: --set: distill.temperature: must be > 0, got -1.0"
    code, output = _cli("distill", "--config", tmp_path / "nope.toml")
    assert code == 2 and output == f"error: {tmp_path / 'nope.toml'}: config file not found"


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())
