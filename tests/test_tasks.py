import math

import torch

from fedtrust.simulations.config import load_config
from fedtrust.simulations.population import build_population
from fedtrust.tasks import build_task, load_trainable_state, trainable_state


def test_char_lm_task_on_shakespeare_uses_one_device_per_speaker():
    cfg = load_config(
        None,
        [
            "task.kind=lm",
            "task.dataset=shakespeare",
            "partition.scheme=natural",
            "task.max_length=32",
            "task.lm_layers=1",
            "task.lm_width=16",
            "task.lm_heads=2",
        ],
    )
    population = build_population(cfg)
    sizes = population.sizes()
    assert population.size > 250
    assert sizes.max() > 20 * sorted(sizes)[len(sizes) // 2]  # heavily skewed activity
    task = population.task
    model = task.build_model(seed=0)
    batch = task.collate(task.train[:4])
    assert (batch["labels"] == -100).sum() == (batch["attention_mask"] == 0).sum()
    metrics = task.evaluate(model, task.test[:50])
    # an untrained model is close to uniform over the character vocabulary
    assert abs(math.log(metrics["perplexity"]) - math.log(task.info["vocab_size"])) < 0.5


def test_intent_task_with_a_local_model_and_frozen_embeddings(tiny_bert, intent_jsonl):
    cfg = load_config(
        None,
        [f'task.dataset="{intent_jsonl}"', f'task.model="{tiny_bert}"', "task.freeze_layers=1"],
    )
    task = build_task(cfg.task)
    model = task.build_model(seed=0)
    state = trainable_state(model)
    assert not any(k.startswith("bert.embeddings.") for k in state)
    assert not any(k.startswith("bert.encoder.layer.0.") for k in state)
    assert any(k.startswith("bert.encoder.layer.1.") for k in state)
    other = task.build_model(seed=0)
    load_trainable_state(other, {k: torch.zeros_like(v) for k, v in state.items()})
    assert all(float(p.abs().sum()) == 0 for p in trainable_state(other).values())
    metrics = task.evaluate(model, task.test)
    assert set(metrics) == {"accuracy", "loss"} and 0 <= metrics["accuracy"] <= 1
