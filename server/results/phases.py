"""Where a run's rounds spent their time: each phase's mean seconds over the profiled rounds and its share of the
mean round time, from the rows' `phases` (server/results/schema.py `RoundPhases`). report.md, `fedstill
simulate --profile` and scripts/profile_round.py print these lines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.results.schema import NODE_PHASES, SERVER_PHASES, RoundPhases, RoundRow

LABELS = {"node_total": "total (slowest node)", "node_busy": "busy (all nodes, summed)"}
NOTE = ("Mean seconds per round over the profiled rounds, and share of the mean round time (query to end of "
        "checkpoint). Node phases are the largest over the nodes, run inside the server's wait, and need not add up; "
        "`busy` is every node's total summed (its share: how many nodes computed at once, on average). The server "
        "phases and `other` (the query, the row, a FedMD digest step) add up to the round.")


@dataclass(frozen=True)
class PhaseLine:
    where: str  # "node", "server" or "round"
    phase: str  # the RoundPhases field ("other" and "round" on the server side)
    mean_s: float | None  # over the rounds where the phase applies; None where it applies in none
    share: float | None  # of the mean round time

    @property
    def label(self) -> str:
        return LABELS.get(self.phase, self.phase)


def phase_lines(rows: Sequence[RoundRow]) -> list[PhaseLine]:
    """One line per node phase, per server phase, `other` and the round; [] when no row has a profile."""
    profiled = [row.phases for row in rows if row.phases is not None]
    if not profiled:
        return []
    round_s = _mean([p.round_s for p in profiled])
    lines = [_line("node", name, [getattr(p, name) for p in profiled], round_s) for name in NODE_PHASES]
    lines += [_line("server", name, [getattr(p, name) for p in profiled], round_s) for name in SERVER_PHASES]
    lines.append(_line("server", "other", [_other(p) for p in profiled], round_s))
    lines.append(PhaseLine("round", "round", round_s, 1.0))
    return lines


def _other(phases: RoundPhases) -> float:
    """The round's time in no server phase."""
    return max(0.0, phases.round_s - sum(getattr(phases, name) or 0.0 for name in SERVER_PHASES))


def _line(where: str, phase: str, values: list[float | None], round_s: float | None) -> PhaseLine:
    mean = _mean([v for v in values if v is not None])
    share = mean / round_s if mean is not None and round_s else None
    return PhaseLine(where, phase, mean, share)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
