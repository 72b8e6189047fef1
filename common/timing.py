"""Seconds per named phase of one piece of work (a node's answer, a server's round), for the run's profile.

Phases nest: time spent in an inner phase is charged to it alone, not also to the phase around it, so the
phases of one clock never add up to more than the time they cover.

    clock = PhaseClock()
    with clock.phase("train"):
        ...
    clock.seconds  # {"train": 1.92}
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """Exclusive seconds per phase, from `time.perf_counter`; `elapsed()` is the time since the clock started."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._open: list[str] = []  # the phases entered and not yet left, innermost last
        self._since = self.started  # when the innermost open phase last started being charged

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time inside the block to `name` (minus any phase nested in it)."""
        self._charge()
        self._open.append(name)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()

    def add(self, name: str, seconds: float) -> None:
        """Charge `seconds` measured elsewhere (a stopwatch) to `name`; negative takes back what belongs elsewhere."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _charge(self) -> None:
        now = time.perf_counter()
        if self._open:
            self.add(self._open[-1], now - self._since)
        self._since = now
