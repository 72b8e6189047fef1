"""Shared fixtures of the unit suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from common.config import default_run_config
from server import exchange

from grid import MemoryGrid, VirtualClock, server_task


@pytest.fixture
def run_config_mapping() -> dict[str, Any]:
    """A fresh, valid run-config mapping: the pyproject defaults, kebab-case keys, as Flower passes them."""
    return default_run_config()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Unit tests train tiny models: one thread each is faster and steadier on shared machines."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def virtual_time(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    """The exchange waits on a virtual clock in every unit test: a silent node's round-timeout passes at once."""
    clock = VirtualClock()
    monkeypatch.setattr(exchange, "CLOCK", exchange.Clock(clock.now, clock.sleep))
    return clock


@pytest.fixture(name="server_task")
def _server_task() -> Iterator[None]:
    """This test process is a ServerApp's task while the test runs: Flower builds Messages only inside one."""
    with server_task():
        yield


@pytest.fixture
def memory_grid(server_task: None) -> type[MemoryGrid]:
    """The suite's one in-memory Grid (tests/unit/grid.py), ready to send: `memory_grid(answer, nodes)`."""
    return MemoryGrid


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The common default umask (022), under which a plain new file is 0644 and a folder 0755; restored afterwards."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)
