"""A simulation's default window of questions (simulations/launcher.py `windowed`): its workers kept busy, the
slowest institutions asked first (server.rounds.Pace)."""

from __future__ import annotations

import os

import pytest

from simulations.launcher import local_client_slots, windowed


def test_a_simulation_keeps_one_question_queued_beyond_its_workers() -> None:
    # Execute
    overrides = windowed({"num-clients": 10}, slots=2)

    # Assert
    assert overrides == {"num-clients": 10, "max-in-flight": 3}


@pytest.mark.parametrize("given", [0, 16])
def test_a_window_the_scenario_or_set_gives_is_kept(given: int) -> None:
    # Execute / Assert: 0 (every question at once) too
    assert windowed({"max-in-flight": given}, slots=2) == {"max-in-flight": given}


def test_this_machine_runs_one_client_per_cpus_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a process allowed on 8 CPUs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)

    # Execute / Assert
    assert [local_client_slots(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
