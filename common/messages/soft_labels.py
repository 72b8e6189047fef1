"""Soft-label messages: the server's query on public samples and the institution's validated reply."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.codecs import CODECS, decode, encode, require_simplex, simplex_tolerance, wire_schema
from common.errors import FingerprintMismatch, MessageFormatError
from common.messages.records import get_array, get_arrays, get_field, get_record
from common.messages.timings import NodeTimings, attach_timings

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
        config = get_record(record, "query", ConfigRecord)
        ids = get_array(record, "sample-ids", "ids")
        if ids.ndim != 1 or ids.dtype != np.int64:
            raise MessageFormatError(f"sample-ids: expected 1-d int64, got {ids.ndim}-d {ids.dtype}")
        query = cls(
            round=get_field(config, "query", "round", int),
            fingerprint=get_field(config, "query", "fingerprint", str),
            temperature=get_field(config, "query", "temperature", float),
            codec=get_field(config, "query", "codec", str),
            num_classes=get_field(config, "query", "num-classes", int),
            sample_ids=ids,
            evaluate_teacher=get_field(config, "query", "evaluate-teacher", bool),
            want_class_counts=get_field(config, "query", "want-class-counts", bool),
            top_k=get_field(config, "query", "top-k", int),
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
    timings: NodeTimings | None = None  # seconds per phase on the node: outside the attested payload (timings.py)

    def to_record(self) -> RecordDict:
        """The reply as sent; the timings, when set, in their own record (the node attaches them after signing)."""
        metrics: dict[str, Any] = {
            "num-examples": self.num_examples, "train-loss": float(self.train_loss),
            "teacher-accuracy": float(self.teacher_accuracy), "teacher-params": self.teacher_params,
            "teacher-rounds": self.teacher_rounds,
        }
        if self.class_counts is not None:
            metrics["class-counts"] = [int(c) for c in self.class_counts]
        record = RecordDict({
            "soft-labels": ArrayRecord({
                name: Array(wire) for name, wire in encode(self.soft_labels, self.codec, self.top_k).items()
            }),
            "release": ConfigRecord({"round": self.round, "fingerprint": self.fingerprint, "codec": self.codec}),
            "metrics": MetricRecord(metrics),
        })
        return record if self.timings is None else attach_timings(record, self.timings)

    @classmethod
    def from_record(cls, record: RecordDict, query: SoftLabelQuery) -> SoftLabelReply:
        """Parse and validate a reply to `query`: schema, fingerprint, shape, dtype, finite, simplex."""
        release = get_record(record, "release", ConfigRecord)
        metrics = get_record(record, "metrics", MetricRecord)
        fingerprint = get_field(release, "release", "fingerprint", str)
        if fingerprint != query.fingerprint:
            raise FingerprintMismatch(
                f"public set fingerprint mismatch: server has {query.fingerprint[:12]}..., the node has "
                f"{fingerprint[:12]}...; the node must hold the same public set (check its data and seed)"
            )
        round_ = get_field(release, "release", "round", int)
        codec = get_field(release, "release", "codec", str)
        if round_ != query.round or codec != query.codec:
            raise MessageFormatError(
                f"release: expected round {query.round} codec {query.codec}, got round {round_} codec {codec}"
            )
        num_examples = get_field(metrics, "metrics", "num-examples", int)
        if num_examples < 1:
            raise MessageFormatError(f"metrics: num-examples must be >= 1, got {num_examples}")
        names = wire_schema(codec, query.num_classes, query.top_k)
        probs = validate_soft_labels(get_arrays(record, "soft-labels", tuple(names)), query)
        return cls(
            round=round_, fingerprint=fingerprint, codec=codec, soft_labels=probs,
            num_examples=num_examples,
            train_loss=get_field(metrics, "metrics", "train-loss", float),
            teacher_accuracy=get_field(metrics, "metrics", "teacher-accuracy", float),
            teacher_params=get_field(metrics, "metrics", "teacher-params", int),
            teacher_rounds=get_field(metrics, "metrics", "teacher-rounds", int),
            class_counts=_class_counts(metrics, query, num_examples), top_k=query.top_k,
            timings=NodeTimings.from_record(record),
        )


def _class_counts(metrics: MetricRecord, query: SoftLabelQuery, num_examples: int) -> np.ndarray | None:
    """Per-class counts, required when the query asked for them; they must add up to num-examples."""
    if not query.want_class_counts:
        return None
    raw = get_field(metrics, "metrics", "class-counts", list)
    counts = np.asarray(raw)
    if counts.shape != (query.num_classes,) or counts.dtype.kind != "i" or (counts < 0).any():
        raise MessageFormatError(
            f"metrics: class-counts must be {query.num_classes} non-negative integers, got {raw[:12]}"
        )
    if int(counts.sum()) != num_examples:
        raise MessageFormatError(f"metrics: class-counts add up to {int(counts.sum())}, num-examples is {num_examples}")
    return counts.astype(np.int64)


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
