"""Typed messages between server and institutions; the only module that knows Flower records.

Each message is a dataclass with `to_record()` and a validating `from_record()` that raises
`MessageFormatError` naming the field, the value found and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.codecs import WIRE_DTYPES, decode, encode, simplex_tolerance
from common.errors import FingerprintMismatch, MessageFormatError

SOFT_LABELS_TYPE = "query.soft_labels"


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

    def to_record(self) -> RecordDict:
        return RecordDict({
            "query": ConfigRecord({
                "round": self.round, "fingerprint": self.fingerprint,
                "temperature": float(self.temperature), "codec": self.codec,
                "num-classes": self.num_classes, "evaluate-teacher": self.evaluate_teacher,
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
        )
        if not query.temperature > 0 or query.codec not in WIRE_DTYPES or query.num_classes < 2:
            raise MessageFormatError(
                f"query: temperature must be > 0, codec one of {list(WIRE_DTYPES)}, num-classes >= 2; "
                f"got {query.temperature}, {query.codec!r}, {query.num_classes}"
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

    def to_record(self) -> RecordDict:
        return RecordDict({
            "soft-labels": ArrayRecord({"probs": Array(encode(self.soft_labels, self.codec))}),
            "release": ConfigRecord({"round": self.round, "fingerprint": self.fingerprint, "codec": self.codec}),
            "metrics": MetricRecord({
                "num-examples": self.num_examples, "train-loss": float(self.train_loss),
                "teacher-accuracy": float(self.teacher_accuracy), "teacher-params": self.teacher_params,
                "teacher-rounds": self.teacher_rounds,
            }),
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
        probs = validate_soft_labels(_get_array(record, "soft-labels", "probs"), query)
        return cls(
            round=round_, fingerprint=fingerprint, codec=codec, soft_labels=probs,
            num_examples=num_examples,
            train_loss=_field(metrics, "metrics", "train-loss", float),
            teacher_accuracy=_field(metrics, "metrics", "teacher-accuracy", float),
            teacher_params=_field(metrics, "metrics", "teacher-params", int),
            teacher_rounds=_field(metrics, "metrics", "teacher-rounds", int),
        )


def validate_soft_labels(wire: np.ndarray, query: SoftLabelQuery) -> np.ndarray:
    """Decode and check a soft-label matrix; returns float32 `(m, C)` rows on the simplex."""
    expected = (len(query.sample_ids), query.num_classes)
    if wire.shape != expected:
        raise MessageFormatError(f"soft-labels: expected shape {expected}, got {wire.shape}")
    probs = decode(wire, query.codec)
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        raise MessageFormatError(f"soft-labels: {bad} rows hold NaN or inf; send finite probabilities")
    if (probs < 0).any():
        raise MessageFormatError(f"soft-labels: negative values (min {probs.min():.3g}); send probabilities")
    sums = probs.sum(axis=1, dtype=np.float64)
    tolerance = simplex_tolerance(query.codec, query.num_classes)
    off = np.abs(sums - 1.0) > tolerance
    if off.any():
        raise MessageFormatError(
            f"soft-labels: {int(off.sum())} rows do not sum to 1 (worst {sums[np.argmax(np.abs(sums - 1.0))]:.6f}, tolerance "
            f"{tolerance:.1e}); send softmax probabilities, not logits"
        )
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


def _field(record: Any, where: str, key: str, kind: type) -> Any:
    if key not in record:
        raise MessageFormatError(f"{where}: missing key {key!r}")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MessageFormatError(f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value
