"""A log as verification reads it (`Chain`: the entries that parsed, with their line numbers) and what is found
wrong with it (`Finding`: file, line, entry, check and message)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.audit.ledger import OPENED


@dataclass(frozen=True)
class Finding:
    log: str
    line: int | None
    seq: int | None
    kind: str | None
    check: str
    message: str

    def __str__(self) -> str:
        where = self.log if self.line is None else f"{self.log} line {self.line}"
        if self.seq is not None or self.kind:
            where += f" (entry {self.seq if self.seq is not None else '?'}, {self.kind or '?'})"
        return f"{where}: {self.check}: {self.message}"


@dataclass
class Chain:
    """The entries of one log that parsed, with their line numbers, and what was wrong with the log."""

    path: Path
    entries: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    problems: list[Finding] = field(default_factory=list)

    @property
    def genesis(self) -> dict[str, Any] | None:
        return self.entries[0][1] if self.entries and self.entries[0][1].get("kind") == OPENED else None

    def problem(self, line: int | None, entry: dict[str, Any] | None, check: str, message: str) -> None:
        entry = entry or {}
        seq = entry.get("seq") if isinstance(entry.get("seq"), int) else None
        kind = entry.get("kind") if isinstance(entry.get("kind"), str) else None
        self.problems.append(Finding(self.label, line, seq, kind, check, message))

    @property
    def label(self) -> str:
        """The file as findings name it: its folder and name (every release log is `release-log.jsonl`)."""
        return f"{self.path.parent.name}/{self.path.name}" if self.path.parent.name else self.path.name
