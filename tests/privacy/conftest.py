"""Fixtures for the fedtrust.privacy tests; helpers live in privacy_helpers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from privacy_helpers import tiny_bert, tiny_gpt2
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def bert() -> nn.Module:
    return tiny_bert().double()


@pytest.fixture
def gpt2() -> nn.Module:
    return tiny_gpt2().double()
