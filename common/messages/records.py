"""Shared helpers of the message modules: checked access to Flower records, digests, sizes, attestations."""

from __future__ import annotations

import base64
import hashlib
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, MetricRecord, RecordDict

from common.audit.attestation import Attestation
from common.audit.canonical import canonical
from common.errors import MessageFormatError

ATTESTATION = "attestation"
TIMINGS = "timings"  # a reply's compute timings (common.messages.timings): attached after signing, never digested

R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)


def get_record(record: RecordDict, key: str, kind: type[R]) -> R:
    """The record `key` of `record`, which must be a `kind`; else a MessageFormatError."""
    if key not in record:
        raise MessageFormatError(f"missing record {key!r} (got {sorted(record.keys())})")
    value = record[key]
    if not isinstance(value, kind):
        raise MessageFormatError(f"record {key!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def get_array(record: RecordDict, key: str, name: str) -> np.ndarray:
    """Array `name` of ArrayRecord `key`, as numpy; missing or undecodable is a MessageFormatError."""
    arrays = get_record(record, key, ArrayRecord)
    if name not in arrays:
        raise MessageFormatError(f"record {key!r}: missing array {name!r}")
    try:
        return arrays[name].numpy()
    except Exception as error:  # a malformed payload must not crash the caller
        raise MessageFormatError(f"record {key!r}: array {name!r} cannot be decoded ({error})") from None


def get_arrays(record: RecordDict, key: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Exactly the arrays `names` of ArrayRecord `key`, as numpy; a missing or extra one is an error."""
    arrays = get_record(record, key, ArrayRecord)
    extra = sorted(set(arrays.keys()) - set(names))
    if extra:
        raise MessageFormatError(f"record {key!r}: unexpected arrays {extra} (expected {sorted(names)})")
    return {name: get_array(record, key, name) for name in names}


def get_field(record: Any, where: str, key: str, kind: type) -> Any:
    """Value `key` of a config or metric record, of type `kind` (an int is accepted as a float)."""
    if key not in record:
        raise MessageFormatError(f"{where}: missing key {key!r}")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MessageFormatError(f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def record_nbytes(record: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it: every object in its tree, deflated."""

    def size(obj: Any) -> int:
        return len(obj.deflate()) + sum(size(child) for child in (obj.children or {}).values())

    return size(record)


def record_digest(record: RecordDict, exclude: tuple[str, ...] = (ATTESTATION, TIMINGS)) -> tuple[str, int]:
    """sha256 (hex) and size of a message's content as sent, every record but `exclude` (by default the
    attestation and the compute timings, which are attached after the reply is signed).

    The digest covers, in sorted key order, each record's key and type and, for arrays, each array's
    name, dtype, shape, storage type and exact data bytes; for config and metric records, the RFC 8785
    canonical JSON of their values (bytes values as base64). The size counts the array data bytes.
    """
    digest, size = hashlib.sha256(), 0
    for key in sorted(k for k in record.keys() if k not in exclude):
        value = record[key]
        digest.update(canonical({"record": key, "type": type(value).__name__}))
        if isinstance(value, ArrayRecord):
            for name in sorted(value.keys()):
                array = value[name]
                digest.update(canonical({"array": name, "dtype": array.dtype, "shape": list(array.shape),
                                         "stype": array.stype, "bytes": len(array.data)}))
                digest.update(array.data)
                size += len(array.data)
        else:
            items = {k: _canonical_value(v) for k, v in value.items()}
            encoded = canonical(items)
            digest.update(encoded)
            size += len(encoded)
    return digest.hexdigest(), size


def _canonical_value(value: Any) -> Any:
    """A record value as RFC 8785 can hold it: bytes as base64, non-finite floats as their names."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not np.isfinite(value):
        return repr(value)
    if isinstance(value, list):
        return [_canonical_value(v) for v in value]
    return value


def payload_description(record: RecordDict, key: str = "soft-labels") -> dict[str, Any]:
    """Kind, codec, shape and dtype of each released array, as an attestation states them."""
    arrays = get_record(record, key, ArrayRecord)
    release = record.get("release")
    return {
        "kind": key,
        "codec": release.get("codec") if isinstance(release, ConfigRecord) else None,
        "arrays": {name: {"dtype": arrays[name].dtype, "shape": list(arrays[name].shape)} for name in sorted(arrays.keys())},
    }


def attach_attestation(record: RecordDict, attestation: Attestation) -> RecordDict:
    """`record` with the attestation added as its config record `attestation`."""
    fields: dict[str, ConfigRecordValues] = {**attestation.as_dict()}
    record[ATTESTATION] = ConfigRecord(fields)
    return record


def read_attestation(record: RecordDict) -> Attestation | None:
    """The reply's attestation, None when it has none; a malformed one is a MessageFormatError."""
    if ATTESTATION not in record:
        return None
    config = get_record(record, ATTESTATION, ConfigRecord)
    return Attestation(get_field(config, ATTESTATION, "statement", str), get_field(config, ATTESTATION, "signature", str))
