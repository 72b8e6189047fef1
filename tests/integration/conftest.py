"""Fixtures of the integration suite: a per-test Flower home, checked for leftover SuperLinks."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.launcher import local_superlinks


@pytest.fixture
def home(tmp_path: Path):
    path = tmp_path / "flwr-home"
    yield path
    assert local_superlinks(path) == [], "the launcher left a local SuperLink running"
