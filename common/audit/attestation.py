"""Signed release attestations: what one reply of one institution released, bound to the exact bytes sent.

The institution builds the statement, canonicalises it (RFC 8785) and signs those bytes with its
Ed25519 key. The server checks, before aggregation, that the signer is on its allow-list, that the
signature holds, that the statement is about this run, round, node and query, and that the sha256
of the payload it received equals the one the institution signed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from common.audit.canonical import canonical, utc_now
from common.audit.keys import Signer, key_id, verify_signature
from common.errors import AuditError

SCHEMA = "fedstill.attestation/1"
SOFT_LABELS = "soft-labels"
NO_PRIVACY = {"mechanism": "none", "parameters": {}, "epsilon": 0.0, "epsilon_total": 0.0, "delta": 0.0}
STATEMENT_FIELDS = (
    "schema", "run_id", "round", "node_id", "institution_id", "key_id", "public_fingerprint", "query_sha256",
    "payload_sha256", "payload_bytes", "payload", "privacy", "data_categories", "software", "time",
)


@dataclass(frozen=True)
class Attestation:
    """A statement (canonical JSON text) and the base64 Ed25519 signature of its UTF-8 bytes."""

    statement: str
    signature: str

    @property
    def fields(self) -> dict[str, Any]:
        """The statement's fields, unchecked; ValueError when it is not a JSON object."""
        fields = json.loads(self.statement)
        if not isinstance(fields, dict):
            raise ValueError(f"attestation statement is a JSON {type(fields).__name__}, not an object")
        return fields

    def as_dict(self) -> dict[str, str]:
        return {"statement": self.statement, "signature": self.signature}


def claimed_institution(attestation: Attestation | None) -> str | None:
    """The institution an attestation names, unchecked (a rejected reply's claim, or before the check); None when
    there is no attestation or its statement is not a JSON object naming one."""
    if attestation is None:
        return None
    try:
        name = attestation.fields.get("institution_id")
    except ValueError:
        return None
    return name if isinstance(name, str) else None


def software_versions() -> dict[str, str]:
    versions = {}
    for package in ("fedstill", "flwr"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def attest(
    signer: Signer, *, run_id: int, round_: int, node_id: int, public_fingerprint: str, query_sha256: str,
    payload_sha256: str, payload_bytes: int, payload: dict[str, Any], data_categories: list[str],
    privacy: dict[str, Any] | None = None,
) -> Attestation:
    """Build, canonicalise and sign the statement of one release.

    Run and node ids are written as decimal strings: Flower's 64-bit ids exceed the integers that
    RFC 8785 (IEEE doubles) represents exactly.
    """
    statement = {
        "schema": SCHEMA, "run_id": str(run_id), "round": int(round_), "node_id": str(node_id),
        "institution_id": signer.name, "key_id": signer.key_id, "public_fingerprint": public_fingerprint,
        "query_sha256": query_sha256, "payload_sha256": payload_sha256, "payload_bytes": int(payload_bytes),
        "payload": payload, "privacy": privacy or dict(NO_PRIVACY), "data_categories": list(data_categories),
        "software": software_versions(), "time": utc_now(),
    }
    text = canonical(statement).decode("utf-8")
    return Attestation(text, signer.sign(text.encode("utf-8")))


def read_statement(attestation: Attestation, where: str) -> dict[str, Any]:
    """Parse a statement, insisting on its canonical form and its fields."""
    try:
        fields = json.loads(attestation.statement)
    except ValueError:
        raise AuditError(f"{where}: attestation statement is not JSON", "statement") from None
    if not isinstance(fields, dict):
        raise AuditError(f"{where}: attestation statement is not a JSON object", "statement")
    missing = [name for name in STATEMENT_FIELDS if name not in fields]
    if missing:
        raise AuditError(f"{where}: attestation statement lacks {missing}", "statement")
    if fields["schema"] != SCHEMA:
        raise AuditError(f"{where}: attestation schema {fields['schema']!r}, expected {SCHEMA!r}", "statement")
    if canonical(fields).decode("utf-8") != attestation.statement:
        raise AuditError(f"{where}: attestation statement is not in RFC 8785 canonical form", "statement")
    return fields


def check_attestation(
    attestation: Attestation, allow_list: dict[str, str], expected: dict[str, Any], where: str
) -> dict[str, Any]:
    """Verify an attestation against the allow-list and the facts the verifier knows; return its fields.

    `expected` maps statement fields (run_id, round, node_id, public_fingerprint, query_sha256,
    payload_sha256, payload_bytes...) to the values the verifier observed; any difference is an
    AuditError naming the field.
    """
    fields = read_statement(attestation, where)
    institution = fields["institution_id"]
    public = allow_list.get(institution)
    if public is None:
        raise AuditError(f"{where}: institution {institution!r} is not on the allow-list (unknown key)", "allow-list")
    if fields["key_id"] != key_id(public):
        raise AuditError(
            f"{where}: signed with key {fields['key_id']}, but the allow-list key of {institution!r} is {key_id(public)}",
            "allow-list",
        )
    try:
        verify_signature(public, attestation.signature, attestation.statement.encode("utf-8"), f"{where}: attestation of {institution!r}")
    except AuditError as error:
        raise AuditError(str(error), "signature") from None
    for name, value in expected.items():
        if fields.get(name) != value:
            check = "digest" if name in ("payload_sha256", "payload_bytes") else "statement"
            raise AuditError(f"{where}: attestation says {name} = {_short(fields.get(name))}, observed {_short(value)}", check)
    return fields


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
