"""Typed messages between server and institutions; the only package that knows Flower records.

Each message is a dataclass with `to_record()` and a validating `from_record()` that raises
`MessageFormatError` naming the field, the value found and what was expected.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.audit.attestation import Attestation
from common.audit.canonical import canonical
from common.codecs import CODECS, decode, encode, require_simplex, simplex_tolerance, wire_schema
from common.errors import FingerprintMismatch, MessageFormatError

SOFT_LABELS_TYPE = "query.soft_labels"
ATTESTATION = "attestation"
DIGEST_TYPE = "train.digest"


@dataclass(frozen=True)
class SoftLabelQuery:
    """Server -> institution: answer with soft labels on these public samples."""

    round: int
    fingerprint: str  # sha256 of the public set the server holds
    temperature: float
    codec: str
    num_classes: int
    sample_ids: np.ndarray  # (m,) int64 indices into the public set
    evaluate_teacher: bool  # report the teacher's test accuracy (simulation benchmarks)
    want_class_counts: bool = False  # ask for per-class sample counts (the expertise rule needs them)
    top_k: int = 1  # classes kept per row by the topk codec (ignored by the others)

    def to_record(self) -> RecordDict:
        return RecordDict({
            "query": ConfigRecord({
                "round": self.round, "fingerprint": self.fingerprint,
                "temperature": float(self.temperature), "codec": self.codec,
                "num-classes": self.num_classes, "evaluate-teacher": self.evaluate_teacher,
                "want-class-counts": self.want_class_counts, "top-k": self.top_k,
            }),
            "sample-ids": ArrayRecord({"ids": Array(np.asarray(self.sample_ids, dtype=np.int64))}),
        })

    @classmethod
    def from_record(cls, record: RecordDict) -> SoftLabelQuery:
        config = _get(record, "query", ConfigRecord)
        ids = _get_array(record, "sample-ids", "ids")
        if ids.ndim != 1 or ids.dtype != np.int64:
            raise MessageFormatError(f"sample-ids: expected 1-d int64, got {ids.ndim}-d {ids.dtype}")
        query = cls(
            round=_field(config, "query", "round", int),
            fingerprint=_field(config, "query", "fingerprint", str),
            temperature=_field(config, "query", "temperature", float),
            codec=_field(config, "query", "codec", str),
            num_classes=_field(config, "query", "num-classes", int),
            sample_ids=ids,
            evaluate_teacher=_field(config, "query", "evaluate-teacher", bool),
            want_class_counts=_field(config, "query", "want-class-counts", bool),
            top_k=_field(config, "query", "top-k", int),
        )
        if not query.temperature > 0 or query.codec not in CODECS or query.num_classes < 2:
            raise MessageFormatError(
                f"query: temperature must be > 0, codec one of {list(CODECS)}, num-classes >= 2; "
                f"got {query.temperature}, {query.codec!r}, {query.num_classes}"
            )
        if not 1 <= query.top_k <= query.num_classes:
            raise MessageFormatError(
                f"query: top-k must be in [1, num-classes = {query.num_classes}], got {query.top_k}"
            )
        return query


@dataclass(frozen=True)
class SoftLabelReply:
    """Institution -> server: soft labels on the queried public samples, and counts only."""

    round: int
    fingerprint: str  # sha256 of the public set the institution holds
    codec: str
    soft_labels: np.ndarray  # (m, C) float32, rows on the simplex
    num_examples: int  # size of the private partition the teacher learnt from
    train_loss: float
    teacher_accuracy: float  # on the test set, or -1.0 when not evaluated
    teacher_params: int
    teacher_rounds: int  # rounds of local training the teacher has had, this one included
    class_counts: np.ndarray | None = None  # (C,) int64 private samples per class, only when asked
    top_k: int = 1  # the query's top-k: classes kept per row by the topk codec

    def to_record(self) -> RecordDict:
        metrics: dict[str, Any] = {
            "num-examples": self.num_examples, "train-loss": float(self.train_loss),
            "teacher-accuracy": float(self.teacher_accuracy), "teacher-params": self.teacher_params,
            "teacher-rounds": self.teacher_rounds,
        }
        if self.class_counts is not None:
            metrics["class-counts"] = [int(c) for c in self.class_counts]
        return RecordDict({
            "soft-labels": ArrayRecord({
                name: Array(wire) for name, wire in encode(self.soft_labels, self.codec, self.top_k).items()
            }),
            "release": ConfigRecord({"round": self.round, "fingerprint": self.fingerprint, "codec": self.codec}),
            "metrics": MetricRecord(metrics),
        })

    @classmethod
    def from_record(cls, record: RecordDict, query: SoftLabelQuery) -> SoftLabelReply:
        """Parse and validate a reply to `query`: schema, fingerprint, shape, dtype, finite, simplex."""
        release = _get(record, "release", ConfigRecord)
        metrics = _get(record, "metrics", MetricRecord)
        fingerprint = _field(release, "release", "fingerprint", str)
        if fingerprint != query.fingerprint:
            raise FingerprintMismatch(
                f"public set fingerprint mismatch: server has {query.fingerprint[:12]}..., the node has "
                f"{fingerprint[:12]}...; the node must hold the same public set (check its data and seed)"
            )
        round_ = _field(release, "release", "round", int)
        codec = _field(release, "release", "codec", str)
        if round_ != query.round or codec != query.codec:
            raise MessageFormatError(
                f"release: expected round {query.round} codec {query.codec}, got round {round_} codec {codec}"
            )
        num_examples = _field(metrics, "metrics", "num-examples", int)
        if num_examples < 1:
            raise MessageFormatError(f"metrics: num-examples must be >= 1, got {num_examples}")
        names = wire_schema(codec, query.num_classes, query.top_k)
        probs = validate_soft_labels(_get_arrays(record, "soft-labels", tuple(names)), query)
        return cls(
            round=round_, fingerprint=fingerprint, codec=codec, soft_labels=probs,
            num_examples=num_examples,
            train_loss=_field(metrics, "metrics", "train-loss", float),
            teacher_accuracy=_field(metrics, "metrics", "teacher-accuracy", float),
            teacher_params=_field(metrics, "metrics", "teacher-params", int),
            teacher_rounds=_field(metrics, "metrics", "teacher-rounds", int),
            class_counts=_class_counts(metrics, query, num_examples), top_k=query.top_k,
        )


def _class_counts(metrics: MetricRecord, query: SoftLabelQuery, num_examples: int) -> np.ndarray | None:
    """Per-class counts, required when the query asked for them; they must add up to num-examples."""
    if not query.want_class_counts:
        return None
    raw = _field(metrics, "metrics", "class-counts", list)
    counts = np.asarray(raw)
    if counts.shape != (query.num_classes,) or counts.dtype.kind != "i" or (counts < 0).any():
        raise MessageFormatError(
            f"metrics: class-counts must be {query.num_classes} non-negative integers, got {raw[:12]}"
        )
    if int(counts.sum()) != num_examples:
        raise MessageFormatError(f"metrics: class-counts add up to {int(counts.sum())}, num-examples is {num_examples}")
    return counts.astype(np.int64)


@dataclass(frozen=True)
class DigestInstruction:
    """Server -> institution (FedMD): learn toward the consensus on these public samples, then revisit."""

    round: int
    fingerprint: str
    temperature: float
    sample_ids: np.ndarray  # (m,) int64 indices into the public set
    consensus: np.ndarray  # (m, C) float32 rows on the simplex; float16 on the wire
    digest_epochs: int
    revisit_epochs: int

    def to_record(self) -> RecordDict:
        return RecordDict({
            "digest": ConfigRecord({
                "round": self.round, "fingerprint": self.fingerprint, "temperature": float(self.temperature),
                "digest-epochs": self.digest_epochs, "revisit-epochs": self.revisit_epochs,
            }),
            "consensus": ArrayRecord({
                "ids": Array(np.asarray(self.sample_ids, dtype=np.int64)),
                "probs": Array(np.asarray(self.consensus, dtype=np.float16)),
            }),
        })

    @classmethod
    def from_record(cls, record: RecordDict) -> DigestInstruction:
        config = _get(record, "digest", ConfigRecord)
        ids = _get_array(record, "consensus", "ids")
        probs = _get_array(record, "consensus", "probs")
        if ids.ndim != 1 or ids.dtype != np.int64 or probs.ndim != 2 or probs.shape[0] != len(ids):
            raise MessageFormatError(f"consensus: expected ids (m,) int64 and probs (m, C), got {ids.shape}, {probs.shape}")
        as_query = SoftLabelQuery(0, "", 1.0, "float16", probs.shape[1], ids, False)
        digest = cls(
            round=_field(config, "digest", "round", int),
            fingerprint=_field(config, "digest", "fingerprint", str),
            temperature=_field(config, "digest", "temperature", float),
            sample_ids=ids, consensus=validate_soft_labels({"probs": probs}, as_query),
            digest_epochs=_field(config, "digest", "digest-epochs", int),
            revisit_epochs=_field(config, "digest", "revisit-epochs", int),
        )
        if not digest.temperature > 0 or digest.digest_epochs < 0 or digest.revisit_epochs < 0:
            raise MessageFormatError("digest: temperature must be > 0 and epochs >= 0")
        return digest


@dataclass(frozen=True)
class DigestReply:
    """Institution -> server: losses of the digest and revisit steps (nothing else leaves)."""

    round: int
    digest_loss: float
    revisit_loss: float

    def to_record(self) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({
            "round": self.round, "digest-loss": float(self.digest_loss), "revisit-loss": float(self.revisit_loss),
        })})

    @classmethod
    def from_record(cls, record: RecordDict) -> DigestReply:
        metrics = _get(record, "metrics", MetricRecord)
        return cls(
            round=_field(metrics, "metrics", "round", int),
            digest_loss=_field(metrics, "metrics", "digest-loss", float),
            revisit_loss=_field(metrics, "metrics", "revisit-loss", float),
        )


def validate_soft_labels(arrays: Mapping[str, np.ndarray] | np.ndarray, query: SoftLabelQuery) -> np.ndarray:
    """Decode the wire arrays of `query.codec` (a bare array is read as {"probs": array}) and check the
    result: shape `(len(sample_ids), num_classes)`, finite, non-negative, rows sum to 1 within the
    codec's `simplex_tolerance`. Returns float32 `(m, C)`; anything else raises `MessageFormatError`."""
    if isinstance(arrays, np.ndarray):
        arrays = {"probs": arrays}
    expected = (len(query.sample_ids), query.num_classes)
    probs = decode(arrays, query.codec, query.num_classes, query.top_k, num_rows=expected[0])
    if probs.shape != expected:
        raise MessageFormatError(f"soft-labels: expected shape {expected}, got {probs.shape}")
    require_simplex(probs, simplex_tolerance(query.codec, query.num_classes, query.top_k))
    return probs


def record_nbytes(record: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it: every object in its tree, deflated."""

    def size(obj: Any) -> int:
        return len(obj.deflate()) + sum(size(child) for child in (obj.children or {}).values())

    return size(record)


def _get(record: RecordDict, key: str, kind: type) -> Any:
    if key not in record:
        raise MessageFormatError(f"missing record {key!r} (got {sorted(record.keys())})")
    value = record[key]
    if not isinstance(value, kind):
        raise MessageFormatError(f"record {key!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _get_array(record: RecordDict, key: str, name: str) -> np.ndarray:
    arrays = _get(record, key, ArrayRecord)
    if name not in arrays:
        raise MessageFormatError(f"record {key!r}: missing array {name!r}")
    try:
        return arrays[name].numpy()
    except Exception as error:  # a malformed payload must not crash the caller
        raise MessageFormatError(f"record {key!r}: array {name!r} cannot be decoded ({error})") from None


def _get_arrays(record: RecordDict, key: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Exactly the arrays `names` of ArrayRecord `key`, as numpy; a missing or extra one is an error."""
    arrays = _get(record, key, ArrayRecord)
    extra = sorted(set(arrays.keys()) - set(names))
    if extra:
        raise MessageFormatError(f"record {key!r}: unexpected arrays {extra} (expected {sorted(names)})")
    return {name: _get_array(record, key, name) for name in names}


def _field(record: Any, where: str, key: str, kind: type) -> Any:
    if key not in record:
        raise MessageFormatError(f"{where}: missing key {key!r}")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MessageFormatError(f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def record_digest(record: RecordDict, exclude: tuple[str, ...] = (ATTESTATION,)) -> tuple[str, int]:
    """sha256 (hex) and size of a message's content as sent, every record but `exclude`.

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
    arrays = _get(record, key, ArrayRecord)
    release = record.get("release")
    return {
        "kind": key,
        "codec": release.get("codec") if isinstance(release, ConfigRecord) else None,
        "arrays": {name: {"dtype": arrays[name].dtype, "shape": list(arrays[name].shape)} for name in sorted(arrays.keys())},
    }


def attach_attestation(record: RecordDict, attestation: Attestation) -> RecordDict:
    record[ATTESTATION] = ConfigRecord(attestation.as_dict())
    return record


def read_attestation(record: RecordDict) -> Attestation | None:
    """The reply's attestation, None when it has none; a malformed one is a MessageFormatError."""
    if ATTESTATION not in record:
        return None
    config = _get(record, ATTESTATION, ConfigRecord)
    return Attestation(_field(config, ATTESTATION, "statement", str), _field(config, ATTESTATION, "signature", str))


from common.messages.secagg import (  # noqa: E402 - re-exported: one import site for every message
    SETUP_TYPE, SHARES_TYPE, UNMASK_TYPE, MaskedReply, SecAggBundles, SecAggKeys, SecAggRoster, SecAggSetup,
    SecAggShares, SecAggUnmask,
)
