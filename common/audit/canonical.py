"""Canonical bytes for signing and hashing: RFC 8785 JSON (JCS), sha256 digests, UTC timestamps."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import rfc8785

from common.errors import AuditError


def canonical(value: Any) -> bytes:
    """RFC 8785 canonical JSON of `value`: sorted keys, no whitespace, ES6 number form, UTF-8."""
    try:
        return rfc8785.dumps(value)
    except Exception as error:  # rfc8785 raises on NaN, infinities, non-string keys, odd types
        raise AuditError(f"cannot canonicalise a record for signing ({type(error).__name__}: {error}); "
                         f"records may hold only strings, finite numbers, booleans, null, lists and objects") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    """The current UTC time as ISO 8601 with microseconds and a `Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
