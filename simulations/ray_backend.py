"""Flower's Ray backend settings for a run: a local Ray instance, or an existing Ray cluster."""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import Config


def backend_config(cfg: Config) -> dict[str, Any]:
    """`run_simulation`'s backend_config: per-ClientApp resources and how Ray starts."""
    return {
        "client_resources": {"num_cpus": cfg.client.num_cpus, "num_gpus": cfg.client.num_gpus},
        "init_args": {
            "num_cpus": max(os.cpu_count() or 1, cfg.client.num_cpus),
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,  # device errors come back in their reply messages
        },
    }
