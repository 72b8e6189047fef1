"""Witness records (common.audit.witness) as they travel: a query's witness request and a reply's cosignature.

The request rides in the query under its own record key, outside the query's digest (the attestation's
`query_sha256` stays the round's one digest, though each institution gets its own proofs and receipts);
the cosignature rides in the reply and is covered by the reply's attestation like everything it carries.
`query.witness` asks only for a cosignature: the coordinator sends it after the run's closing entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from common.audit.witness import Cosignature, WitnessRequest
from common.errors import AuditError, MessageFormatError
from common.messages.records import ATTESTATION, get_field, get_record

WITNESS = "witness"  # the query's record: {"request": <WitnessRequest JSON>}
COSIGNATURE = "witness-cosignature"  # the reply's record: the cosignature's fields
WITNESS_TYPE = "query.witness"
QUERY_DIGEST_EXCLUDES = (ATTESTATION, WITNESS)  # what a query's digest leaves out


@dataclass(frozen=True)
class WitnessCall:
    """`query.witness`: cosign the final tree head of the run (its request rides in the message's witness record)."""

    round: int

    def to_record(self) -> RecordDict:
        return RecordDict({"witness-call": ConfigRecord({"round": self.round})})

    @classmethod
    def from_record(cls, record: RecordDict) -> WitnessCall:
        return cls(get_field(get_record(record, "witness-call", ConfigRecord), "witness-call", "round", int))


def with_witness_request(record: RecordDict, request: WitnessRequest) -> RecordDict:
    """A copy of `record` carrying `request` (the arrays are shared, not copied)."""
    copy = RecordDict({key: record[key] for key in record.keys()})
    copy[WITNESS] = ConfigRecord({"request": request.to_json()})
    return copy


def read_witness_request(record: RecordDict) -> WitnessRequest | None:
    """The query's witness request; None when it carries none. A malformed one is a MessageFormatError."""
    if WITNESS not in record.keys():
        return None
    value = record[WITNESS]
    text = value.get("request") if isinstance(value, ConfigRecord) else None
    if not isinstance(text, str):
        raise MessageFormatError(f"record {WITNESS!r} must be a config record with a text field 'request'")
    try:
        return WitnessRequest.from_json(text)
    except AuditError as error:
        raise MessageFormatError(str(error)) from None


def attach_cosignature(record: RecordDict, cosignature: Cosignature) -> RecordDict:
    record[COSIGNATURE] = ConfigRecord(cosignature.as_dict())
    return record


def read_cosignature(record: RecordDict) -> dict[str, object] | None:
    """The reply's cosignature fields, unchecked (server.witness checks them); None when it carries none."""
    value = record[COSIGNATURE] if COSIGNATURE in record.keys() else None
    return dict(value.items()) if isinstance(value, ConfigRecord) else None
