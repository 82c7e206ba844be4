"""Shared settings for the tiny end-to-end runs."""

from __future__ import annotations

from pathlib import Path


def tiny_run_config(tmp_path: Path, model: Path, data: Path, name: str, *settings: str):
    """A run config for the tiny BERT on the tiny intent data; `settings` override the base."""
    from fedtrust.simulations.config import load_config

    base = [
        f'task.dataset="{data}"',
        f'task.model="{model}"',
        "task.freeze_embeddings=false",
        "task.freeze_layers=0",
        "client.lr=1e-2",
        "client.head_lr_scale=1",
        "client.num_cpus=1",
        "server.eval_examples=0",
        f'run.output_dir="{tmp_path}"',
        f'run.name="{name}"',
    ]
    return load_config(None, [*base, *settings])
