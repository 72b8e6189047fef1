"""An institution's own persisted privacy ledger: what it has spent, checked against its budget before each release.

The ledger lives on the institution's node and is the institution's decision; the server never sets or
reads it. It is one JSON file:

    {"delta": 1e-05,
     "entries": [{"run_id": "...", "round": 3, "event": {<privacy history entry>},
                  "epsilon_after": 1.23, "time": "2025-01-01T00:00:00+00:00"}, ...]}

Spent epsilon is always recomputed from the events (common.privacy.accounting), never summed from
`epsilon_after`, which is kept for people reading the file. Epsilons at different deltas do not add, so
the ledger is bound to one delta. Use it as: `check` -> release -> `record`. One writer at a time.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError, PrivacyBudgetExceeded
from common.files import atomic_write_text
from common.privacy import accounting

BUDGET_TOLERANCE = 1e-9
"""A release that brings the total to max-epsilon within this (absolute) tolerance is allowed."""

_DO_NOT_DELETE = (
    "do not delete it lightly: deleting the ledger resets this institution's record of spent privacy "
    "budget; restore it from a backup or repair it by hand"
)


class PrivacyLedger:
    """The persisted privacy spend of one institution, with its budget (max_epsilon at delta)."""

    def __init__(self, path: Path, max_epsilon: float, delta: float) -> None:
        """Use PrivacyLedger.open, which validates its arguments and creates or checks the file."""
        self.path = path
        self.max_epsilon = max_epsilon
        self.delta = delta

    @classmethod
    def open(cls, path: str | os.PathLike[str], max_epsilon: float, delta: float) -> PrivacyLedger:
        """Load the ledger at `path`, or create an empty one; max_epsilon may be math.inf (no budget)."""
        if isinstance(max_epsilon, bool) or not isinstance(max_epsilon, numbers.Real) or not max_epsilon > 0:
            raise ConfigError(
                f"max-epsilon must be a number > 0 (or inf for no budget), got {max_epsilon!r}; "
                "set max-epsilon in this institution's node config"
            )
        accounting.check_delta(delta)
        ledger = cls(Path(path), float(max_epsilon), float(delta))
        if ledger.path.exists():
            ledger._load()  # validates the file and its delta
        else:
            ledger.path.parent.mkdir(parents=True, exist_ok=True)
            ledger._write([])
        return ledger

    def history(self) -> list[dict[str, Any]]:
        """The privacy history (one event per release) recorded so far, oldest first."""
        return [entry["event"] for entry in self._load()]

    def spent(self) -> float:
        """Epsilon spent so far, at the ledger's delta."""
        return accounting.epsilon(self.history(), self.delta)

    def would_spend(self, events: Sequence[Mapping[str, Any]]) -> float:
        """Total epsilon, at the ledger's delta, after the releases described by `events`."""
        return accounting.epsilon(self.history() + [accounting.check_entry(e) for e in events], self.delta)

    def check(self, events: Sequence[Mapping[str, Any]], what: str) -> None:
        """Raise PrivacyBudgetExceeded if releasing `events` (described by `what`) would exceed max-epsilon."""
        spent = self.spent()
        after = self.would_spend(events)
        if after > self.max_epsilon + BUDGET_TOLERANCE:
            raise PrivacyBudgetExceeded(
                f"{what} refused: this institution has spent epsilon {spent:.6g} and the release would "
                f"bring it to {after:.6g}, above max-epsilon {self.max_epsilon:.6g} (delta {self.delta:g}, "
                f"ledger {self.path}); raise max-epsilon in this institution's node config, or lower "
                "the number of rounds/queries, or raise the noise"
            )

    def record(self, events: Sequence[Mapping[str, Any]], run_id: str, round_: int) -> float:
        """Append `events` (already released) and persist atomically; return the total epsilon after.

        Recording never refuses on budget grounds: the release has happened, so it must be counted.
        Call `check` before releasing.
        """
        if not isinstance(run_id, str) or not run_id:
            raise ConfigError(f"ledger record: run_id must be a non-empty string, got {run_id!r}")
        if isinstance(round_, bool) or not isinstance(round_, numbers.Integral) or round_ < 0:
            raise ConfigError(f"ledger record: round must be an integer >= 0, got {round_!r}")
        entries = self._load()
        history = [entry["event"] for entry in entries]
        time = datetime.now(UTC).isoformat(timespec="seconds")
        total = accounting.epsilon(history, self.delta)
        for event in events:
            clean = accounting.check_entry(event)
            history.append(clean)
            total = accounting.epsilon(history, self.delta)
            entries.append(
                {"run_id": run_id, "round": int(round_), "event": clean, "epsilon_after": total, "time": time}
            )
        self._write(entries)
        return total

    def _load(self) -> list[dict[str, Any]]:
        """The validated entries of the file; DataError if unreadable, ConfigError on a delta mismatch."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(
                f"privacy ledger {self.path} is unreadable ({type(error).__name__}); {_DO_NOT_DELETE}"
            ) from None
        if not isinstance(data, dict) or set(data) != {"delta", "entries"} or not isinstance(data["entries"], list):
            raise DataError(
                f"privacy ledger {self.path} is malformed: expected keys 'delta' and 'entries' (a list); "
                f"{_DO_NOT_DELETE}"
            )
        if data["delta"] != self.delta:
            raise ConfigError(
                f"privacy ledger {self.path} is kept at delta {data['delta']!r} but delta {self.delta!r} was "
                "requested; epsilons at different deltas do not add, so set delta in the node config back "
                "to the ledger's, or start a new ledger at a new path"
            )
        for index, entry in enumerate(data["entries"]):
            _check_stored(entry, index, self.path)
        return data["entries"]

    def _write(self, entries: list[dict[str, Any]]) -> None:
        """Replace the file atomically (owner-only, 0600): temp file, fsync, os.replace, fsync folder."""
        text = json.dumps({"delta": self.delta, "entries": entries}, indent=1, allow_nan=False)
        atomic_write_text(self.path, text, mode=0o600)


def _check_stored(entry: Any, index: int, path: Path) -> None:
    """DataError unless `entry` is a well-formed stored ledger entry."""
    fields: dict[str, type | tuple[type, ...]] = {"run_id": str, "round": int, "event": dict, "epsilon_after": (int, float), "time": str}
    if not isinstance(entry, dict) or set(entry) != set(fields):
        raise DataError(
            f"privacy ledger {path}: entry {index} is malformed (expected {sorted(fields)}); {_DO_NOT_DELETE}"
        )
    for field, kind in fields.items():
        if isinstance(entry[field], bool) or not isinstance(entry[field], kind):
            raise DataError(f"privacy ledger {path}: entry {index} has an ill-typed {field}; {_DO_NOT_DELETE}")
    try:
        accounting.check_entry(entry["event"])
    except ConfigError as error:
        raise DataError(f"privacy ledger {path}: entry {index}: {error}; {_DO_NOT_DELETE}") from None
