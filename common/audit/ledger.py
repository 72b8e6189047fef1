"""Append-only, hash-chained, signed JSONL logs: the coordinator's ledger and each institution's release log.

Each line is the RFC 8785 canonical JSON of one entry:

    {"seq": n, "ledger": <uuid of the log>, "time": <UTC>, "kind": ..., "body": {...},
     "prev": <hash of entry n-1, or 64 zeros>, "hash": sha256(canonical(those six fields)),
     "signer": <name>, "key": "ed25519:...", "sig": Ed25519(key, hash as ASCII)}

Entry 0 has kind `ledger-opened` and names the signer's key. Changing, deleting, reordering or
inserting an entry breaks a hash link, the sequence or a signature; `common.audit.verify` checks them.

Durability: every append is written whole, flushed and fsync'd under an exclusive file lock, to a file
only its owner may read (0600, common.files.private_descriptor). A crash mid-write can only leave a torn
last line; the next `open` moves those bytes aside (`<log>.torn-<time>`), truncates to the last whole
entry and records a `ledger-recovered` entry, so earlier entries are never touched and the chain goes on.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from common.audit.canonical import canonical, sha256_hex, utc_now
from common.audit.keys import Signer
from common.errors import AuditError
from common.files import PRIVATE, atomic_write_bytes, private_descriptor, private_folder

GENESIS_PREV = "0" * 64
OPENED, RECOVERED, RESUMED = "ledger-opened", "ledger-recovered", "ledger-resumed"
CORE_FIELDS = ("seq", "ledger", "time", "kind", "body", "prev")
ENTRY_FIELDS = (*CORE_FIELDS, "hash", "signer", "key", "sig")
TAIL_CHUNK = 1 << 16


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of an entry's core fields (everything but hash and signature)."""
    return sha256_hex(canonical({name: entry[name] for name in CORE_FIELDS}))


def make_entry(signer: Signer, seq: int, ledger_id: str, kind: str, body: dict[str, Any], prev: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"seq": seq, "ledger": ledger_id, "time": utc_now(), "kind": kind, "body": body, "prev": prev}
    entry["hash"] = entry_hash(entry)
    entry.update(signer=signer.name, key=signer.public, sig=signer.sign(entry["hash"].encode("ascii")))
    return entry


class Ledger:
    """One hash-chained log file, appended to by one signer (the coordinator, or one institution)."""

    def __init__(self, path: Path, signer: Signer) -> None:
        self.path = Path(path)
        self.signer = signer
        self.busy_s = 0.0  # seconds spent appending so far (sign, write, fsync): the coordinator's profile reads it

    @classmethod
    def open(cls, path: Path | str, signer: Signer, opening: dict[str, Any] | None = None) -> Ledger:
        """Open (creating with a `ledger-opened` entry if new) a log whose entries `signer` signs.

        An existing log must have been signed by the same key; it is continued, not rewritten, and a
        torn last line from a crash is set aside first.
        """
        ledger = cls(Path(path), signer)
        private_folder(ledger.path.parent)
        with ledger._locked() as handle:
            last = ledger._last_entry(handle)
            if last is None:
                body = {"signer": signer.name, "key": signer.public, **(opening or {})}
                ledger._write(handle, make_entry(signer, 0, str(uuid.uuid4()), OPENED, body, GENESIS_PREV))
            elif last["key"] != signer.public:
                raise AuditError(
                    f"{ledger.path} is signed by {last['signer']!r} (key {last['key'][:20]}...), not by "
                    f"{signer.name!r}: each log has one signer; use another file or the right key"
                )
        return ledger

    def append(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Append one signed entry durably and return it."""
        started = time.perf_counter()
        try:
            with self._locked() as handle:
                last = self._last_entry(handle)
                if last is None:
                    raise AuditError(f"{self.path} is empty: open it with Ledger.open first")
                entry = make_entry(self.signer, last["seq"] + 1, last["ledger"], kind, body, last["hash"])
                self._write(handle, entry)
        finally:
            self.busy_s += time.perf_counter() - started
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, parsed (no verification: see common.audit.verify)."""
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    @contextmanager
    def _locked(self) -> Iterator[BinaryIO]:
        descriptor = private_descriptor(self.path, os.O_RDWR)  # owner-only (0600), also a log an older version made
        with os.fdopen(descriptor, "r+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _write(self, handle: BinaryIO, entry: dict[str, Any]) -> None:
        handle.seek(0, os.SEEK_END)
        handle.write(canonical(entry) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())

    def _last_entry(self, handle: BinaryIO) -> dict[str, Any] | None:
        """The last whole entry; a torn tail (no final newline) is moved aside and recorded first."""
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        handle.seek(size - 1)
        if handle.read(1) != b"\n":
            return self._recover_torn_tail(handle, size)
        line = _last_line(handle, size)
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or any(name not in entry for name in ENTRY_FIELDS):
                raise ValueError("missing fields")
        except ValueError:
            raise AuditError(
                f"{self.path}: the last entry is not a whole ledger entry; run `fedstill audit verify {self.path}` "
                f"and move the file aside before starting a new log"
            ) from None
        return entry

    def _recover_torn_tail(self, handle: BinaryIO, size: int) -> dict[str, Any] | None:
        start = _last_newline_before(handle, size) + 1
        if start > 0:  # the last whole entry must be ours before we touch the file
            try:
                whole = json.loads(_last_line(handle, start))
            except ValueError:
                whole = None  # not an entry: _last_entry refuses it below
            if isinstance(whole, dict) and whole.get("key") != self.signer.public:
                raise AuditError(
                    f"{self.path} is signed by {whole.get('signer')!r}, not by {self.signer.name!r}, and its last "
                    f"line is torn: open it with its own key to recover it"
                )
        handle.seek(start)
        torn = handle.read()
        aside = self.path.with_name(f"{self.path.name}.torn-{utc_now().replace(':', '')}")
        atomic_write_bytes(aside, torn, mode=PRIVATE)
        handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())
        last = self._last_entry(handle)
        if last is None:
            return None  # the crash tore the very first entry: start afresh
        body = {"torn_bytes": len(torn), "torn_sha256": sha256_hex(torn), "set_aside": aside.name}
        entry = make_entry(self.signer, last["seq"] + 1, last["ledger"], RECOVERED, body, last["hash"])
        self._write(handle, entry)
        return entry


def _last_newline_before(handle: BinaryIO, end: int) -> int:
    """Offset of the last b'\\n' before `end`, or -1."""
    position = end
    while position > 0:
        start = max(0, position - TAIL_CHUNK)
        handle.seek(start)
        chunk = handle.read(position - start)
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found
        position = start
    return -1


def _last_line(handle: BinaryIO, size: int) -> bytes:
    """The last line of a file that ends with a newline, without it."""
    start = _last_newline_before(handle, size - 1) + 1
    handle.seek(start)
    return handle.read(size - 1 - start)
