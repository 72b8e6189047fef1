"""Shared fixtures of the unit suite."""

from __future__ import annotations

from typing import Any

import pytest

from common.config import default_run_config


@pytest.fixture
def run_config_mapping() -> dict[str, Any]:
    """A fresh, valid run-config mapping: the pyproject defaults, kebab-case keys, as Flower passes them."""
    return default_run_config()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Unit tests train tiny models: one thread each is faster and steadier on shared machines."""
    import torch

    torch.set_num_threads(1)
