"""Where a round's time goes: the server's phases, the nodes' reported timings, and the server's peak memory.

The round's code marks its phases on a `RoundClock`; the exchange measures its own wait and judging
(server/exchange.py); the ledger counts the seconds it spends appending, wherever an append happens, and those
are taken out of the phase they fell in and charged to `ledger`. The nodes' phases come from the timings their
accepted replies carry (common.messages.timings). `phases()` gives results.json's `RoundPhases`.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from common.audit.ledger import Ledger
from common.messages import NODE_PHASES, NodeTimings
from common.timing import PhaseClock
from server.exchange import Exchange
from server.results.schema import RoundPhases

DIGITS = 4  # 0.1 ms


class RoundClock:
    """One round's server phases, each exclusive of the others and of the ledger's writes (its phases do not nest)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.clock = PhaseClock()
        self.ledger_at_start = ledger.busy_s

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the block's time to `name`, less the ledger appends made inside it."""
        before = self.ledger.busy_s
        with self.clock.phase(name):
            yield
        self.clock.add(name, -(self.ledger.busy_s - before))

    def add(self, name: str, seconds: float) -> None:
        """Charge seconds measured elsewhere (Flower's FedAvg average) to `name`."""
        self.clock.add(name, seconds)

    def exchanged(self, judged: Exchange[Any]) -> None:
        """Add an exchange's own measures: its wait for the replies, its judging of them, and its folding of them."""
        self.clock.add("wait", judged.wait_s)
        self.clock.add("validate", judged.validate_s)
        self.clock.add("aggregate", judged.fold_s)  # replies folded into the running aggregate as they arrived

    def phases(self, replies: Iterable[Any]) -> RoundPhases:
        """The round so far as results.json's `phases`, with the nodes' timings from `replies` (the parsed accepted
        replies; those without a `timings` field, or that carried none, are left out)."""
        figures: dict[str, Any] = {name: round(max(0.0, value), DIGITS) for name, value in self.clock.seconds.items()}
        figures["ledger"] = round(self.ledger.busy_s - self.ledger_at_start, DIGITS)
        figures.update(node_phases(getattr(r, "timings", None) for r in replies))
        return RoundPhases(**figures, round_s=round(self.clock.elapsed(), DIGITS))


def node_phases(timings: Iterable[NodeTimings | None]) -> dict[str, Any]:
    """Per node phase the largest over the nodes that reported it, `node_total` the slowest node's, `node_busy` all
    nodes' totals summed, and how many nodes reported timings."""
    reported = [t for t in timings if t is not None]
    phases: dict[str, Any] = {"nodes_timed": len(reported)}
    for name in NODE_PHASES:
        values = [value for t in reported if (value := getattr(t, name)) is not None]
        phases[name] = max(values) if values else None
    phases["node_total"] = max((t.total for t in reported), default=None)
    phases["node_busy"] = round(sum(t.total for t in reported), DIGITS) if reported else None
    return phases


def peak_rss_bytes() -> int:
    """This process's peak resident set size, in bytes (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)

