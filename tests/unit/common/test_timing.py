"""common/timing.py: a phase clock charges nested time to the innermost phase only."""

from __future__ import annotations

import pytest

from common import timing


class FakeTime:
    """perf_counter that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nested_phases_are_exclusive_and_add_up_to_the_time_covered(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    clock_time = FakeTime()
    monkeypatch.setattr(timing.time, "perf_counter", clock_time)
    clock = timing.PhaseClock()

    # Execute
    clock_time.now += 0.25  # before any phase: charged to none
    with clock.phase("load"):
        clock_time.now += 1.0
        with clock.phase("sign"):
            clock_time.now += 2.0
        clock_time.now += 0.5
    with clock.phase("load"):
        clock_time.now += 0.25
    clock.add("train", 3.0)

    # Assert
    assert clock.seconds == {"load": 1.75, "sign": 2.0, "train": 3.0}
    assert clock.elapsed() == 4.0


def test_a_phase_that_raises_is_still_charged(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    clock_time = FakeTime()
    monkeypatch.setattr(timing.time, "perf_counter", clock_time)
    clock = timing.PhaseClock()

    # Execute
    with pytest.raises(RuntimeError), clock.phase("train"):
        clock_time.now += 1.5
        raise RuntimeError("out of memory")
    with clock.phase("label"):
        clock_time.now += 0.5

    # Assert
    assert clock.seconds == {"train": 1.5, "label": 0.5}
