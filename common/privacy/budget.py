"""An institution's own persisted privacy ledger: what it has spent, checked against its budget before each release.

The ledger lives on the institution's node and is the institution's decision; the server never sets or
reads it. It is one JSON file:

    {"delta": 1e-05,
     "entries": [{"run_id": "...", "round": 3, "event": {<privacy history entry>},
                  "epsilon_after": 1.23, "time": "2025-01-01T00:00:00+00:00"}, ...]}

Spent epsilon is always recomputed from the events (common.privacy.accounting), never summed from
`epsilon_after`, which is kept for people reading the file. Epsilons at different deltas do not add, so
the ledger is bound to one delta.

Spends are atomic: `with ledger.reserve(events, what, run_id, round_) as spend:` takes an exclusive
lock (fcntl.flock on `<ledger>.lock`, next to the ledger), re-reads the ledger, refuses what would exceed
max-epsilon, runs the release inside the block and records it when the block ends; an exception in the
block records nothing. Two runs on one node (two processes, or two handles in one) therefore never
overspend nor erase each other's record: the second waits for the first. The lock is advisory and local:
keep the ledger on a local file system (flock does not reach across NFS clients).

Errors name counts, epsilons and the fix, never the ledger's path: they travel to the server as the
node's error reply. The path stays on the node (the caller logs it; the chained cause keeps it).
"""

from __future__ import annotations

import fcntl
import json
import math
import numbers
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError, PrivacyBudgetExceeded
from common.files import PRIVATE, atomic_write_text, private_descriptor, private_folder
from common.privacy import accounting

BUDGET_TOLERANCE = 1e-9
"""A release that brings the total to max-epsilon within this (absolute) tolerance is allowed."""

LEDGER = "this institution's privacy ledger (node config privacy-ledger)"
"""How errors name the ledger: never by its path, which is the institution's own business."""

_DO_NOT_DELETE = (
    "do not delete it lightly: deleting the ledger resets this institution's record of spent privacy "
    "budget; restore it from a backup or repair it by hand"
)


@dataclass
class Spend:
    """One release reserved by `PrivacyLedger.reserve`, as the block inside sees it."""

    before: float
    """Epsilon spent before this release (read under the lock)."""
    events: list[dict[str, Any]]
    """What is recorded when the block ends: the planned events, unless the block sets what it did."""
    granted: bool = True
    """False only under reserve(refuse=False) when the planned events do not fit: release nothing."""
    after: float = field(default=math.nan)
    """The total after recording, set when the block ends without an exception (before, if not granted)."""


class PrivacyLedger:
    """The persisted privacy spend of one institution, with its budget (max_epsilon at delta)."""

    def __init__(self, path: Path, max_epsilon: float, delta: float) -> None:
        """Use PrivacyLedger.open, which validates its arguments and creates or checks the file."""
        self.path = path
        self.max_epsilon = max_epsilon
        self.delta = delta
        self._held = threading.local()  # this handle, in this thread, holds the lock

    @property
    def lock_path(self) -> Path:
        """The lock file next to the ledger (kept: removing a lock file others may hold breaks the lock)."""
        return self.path.with_name(self.path.name + ".lock")

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
        try:
            private_folder(ledger.path.parent)
        except OSError as error:
            raise DataError(f"{LEDGER}: its folder cannot be created ({_reason(error)}); check the path") from error
        with ledger._exclusive():  # two first runs must not both create it (the second would erase the first)
            if ledger.path.exists():
                ledger._load()  # validates the file and its delta
            else:
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
        """Raise PrivacyBudgetExceeded if releasing `events` (described by `what`) would exceed max-epsilon.

        A check alone reserves nothing: to check, release and record as one step, use `reserve`.
        """
        self._check(self.history(), [accounting.check_entry(e) for e in events], what)

    @contextmanager
    def reserve(
        self, events: Sequence[Mapping[str, Any]], what: str, run_id: str, round_: int, *, refuse: bool = True
    ) -> Iterator[Spend]:
        """Check, release (the block) and record as one step, under the ledger's exclusive lock.

        Raises PrivacyBudgetExceeded before the block when the planned `events` do not fit; with
        `refuse=False` it yields a Spend with `granted=False` instead, and the block must release
        nothing. The block may replace `spend.events` with what it actually released. When the block
        ends, the events are recorded (recording never refuses: the release has happened); when it
        raises, nothing is recorded. Other handles' reserve, record and open wait for the lock.
        """
        _check_record_arguments(run_id, round_)
        planned = [accounting.check_entry(e) for e in events]
        with self._exclusive():
            entries = self._load()
            history = [entry["event"] for entry in entries]
            before = accounting.epsilon(history, self.delta)
            granted = True
            try:
                self._check(history, planned, what)
            except PrivacyBudgetExceeded:
                if refuse:
                    raise
                granted = False
            spend = Spend(before=before, events=planned if granted else [], granted=granted, after=before)
            yield spend
            if spend.granted and spend.events:
                spend.after = self._append(entries, spend.events, run_id, round_)

    def record(self, events: Sequence[Mapping[str, Any]], run_id: str, round_: int) -> float:
        """Append `events` (already released) and persist atomically, under the lock; return the total after.

        Recording never refuses on budget grounds: the release has happened, so it must be counted.
        Prefer `reserve`, which checks before releasing and records under the same lock.
        """
        _check_record_arguments(run_id, round_)
        clean = [accounting.check_entry(e) for e in events]
        with self._exclusive():
            return self._append(self._load(), clean, run_id, round_)

    def _check(self, history: list[dict[str, Any]], events: list[dict[str, Any]], what: str) -> None:
        spent = accounting.epsilon(history, self.delta)
        after = accounting.epsilon(history + events, self.delta)
        if after > self.max_epsilon + BUDGET_TOLERANCE:
            raise PrivacyBudgetExceeded(
                f"{what} refused: this institution has spent epsilon {spent:.6g} over {len(history)} "
                f"release(s) and the release would bring it to {after:.6g}, above max-epsilon "
                f"{self.max_epsilon:.6g} (delta {self.delta:g}); raise max-epsilon in this institution's "
                "node config, or lower the number of rounds/queries, or raise the noise"
            )

    def _append(self, entries: list[dict[str, Any]], events: list[dict[str, Any]], run_id: str, round_: int) -> float:
        """Append checked `events` to `entries` (read under the lock held by the caller), write, return the total."""
        history = [entry["event"] for entry in entries]
        time = datetime.now(UTC).isoformat(timespec="seconds")
        total = accounting.epsilon(history, self.delta)
        for event in events:
            history.append(event)
            total = accounting.epsilon(history, self.delta)
            entries.append(
                {"run_id": run_id, "round": int(round_), "event": event, "epsilon_after": total, "time": time}
            )
        self._write(entries)
        return total

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the exclusive lock on `<ledger>.lock` (blocking until other holders release it)."""
        if getattr(self._held, "value", False):
            raise RuntimeError(
                "privacy ledger: this handle already holds the ledger's lock (a record or reserve inside a "
                "reserve block would wait for itself); record through the Spend of the enclosing reserve"
            )
        try:
            fd = private_descriptor(self.lock_path, os.O_RDWR)
        except OSError as error:
            raise DataError(
                f"{LEDGER}: its lock file cannot be opened ({_reason(error)}); check that the ledger's folder "
                "is writable by this node"
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, also if this process dies
            self._held.value = True
            yield
        finally:
            self._held.value = False
            os.close(fd)

    def _load(self) -> list[dict[str, Any]]:
        """The validated entries of the file; DataError if unreadable, ConfigError on a delta mismatch."""
        delta, entries = read_ledger_file(self.path)
        if delta != self.delta:
            raise ConfigError(
                f"{LEDGER} is kept at delta {delta!r} but delta {self.delta!r} was requested; epsilons "
                "at different deltas do not add, so set delta in the node config back to the ledger's, or start "
                "a new ledger at a new path"
            )
        return entries

    def _write(self, entries: list[dict[str, Any]]) -> None:
        """Replace the file atomically (owner-only, 0600): temp file, fsync, os.replace, fsync folder."""
        text = json.dumps({"delta": self.delta, "entries": entries}, indent=1, allow_nan=False)
        atomic_write_text(self.path, text, mode=PRIVATE)


def read_ledger_file(path: str | os.PathLike[str]) -> tuple[float, list[dict[str, Any]]]:
    """The delta and validated entries of a privacy ledger file, read as they are: no lock taken, nothing
    written (an auditor reads a copy). DataError if unreadable or malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{LEDGER} is unreadable ({type(error).__name__}); {_DO_NOT_DELETE}") from error
    if not isinstance(data, dict) or set(data) != {"delta", "entries"} or not isinstance(data["entries"], list):
        raise DataError(f"{LEDGER} is malformed: expected keys 'delta' and 'entries' (a list); {_DO_NOT_DELETE}")
    for index, entry in enumerate(data["entries"]):
        _check_stored(entry, index)
    return data["delta"], data["entries"]


def _check_record_arguments(run_id: str, round_: int) -> None:
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"ledger record: run_id must be a non-empty string, got {run_id!r}")
    if isinstance(round_, bool) or not isinstance(round_, numbers.Integral) or round_ < 0:
        raise ConfigError(f"ledger record: round must be an integer >= 0, got {round_!r}")


def _reason(error: OSError) -> str:
    """An OSError without its file name: the error's kind and text."""
    return f"{type(error).__name__}: {error.strerror}" if error.strerror else type(error).__name__


def _check_stored(entry: Any, index: int) -> None:
    """DataError unless `entry` is a well-formed stored ledger entry."""
    fields: dict[str, type | tuple[type, ...]] = {"run_id": str, "round": int, "event": dict, "epsilon_after": (int, float), "time": str}
    if not isinstance(entry, dict) or set(entry) != set(fields):
        raise DataError(f"{LEDGER}: entry {index} is malformed (expected {sorted(fields)}); {_DO_NOT_DELETE}")
    for name, kind in fields.items():
        if isinstance(entry[name], bool) or not isinstance(entry[name], kind):
            raise DataError(f"{LEDGER}: entry {index} has an ill-typed {name}; {_DO_NOT_DELETE}")
    try:
        accounting.check_entry(entry["event"])
    except ConfigError as error:
        raise DataError(f"{LEDGER}: entry {index}: {error}; {_DO_NOT_DELETE}") from None
