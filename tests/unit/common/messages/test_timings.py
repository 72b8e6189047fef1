"""common/messages/timings.py: a reply's compute timings travel in their own record, outside the attested payload."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.errors import MessageFormatError
from common.messages import NodeTimings, SoftLabelQuery, SoftLabelReply, TrainReply, attach_timings, record_digest

QUERY = SoftLabelQuery(round=2, fingerprint="ab" * 32, temperature=3.0, codec="float16", num_classes=3,
                       sample_ids=np.arange(4, dtype=np.int64), evaluate_teacher=False)
TIMINGS = NodeTimings(total=2.5, load=0.25, train=1.5, label=0.5, sign=0.125)


def make_reply(timings: NodeTimings | None = None) -> SoftLabelReply:
    return SoftLabelReply(round=2, fingerprint="ab" * 32, codec="float16", soft_labels=np.full((4, 3), 1 / 3, np.float32),
                          num_examples=10, train_loss=0.5, teacher_accuracy=-1.0, teacher_params=100, teacher_rounds=2,
                          timings=timings)


def test_timings_round_trip_in_replies_and_are_none_when_absent() -> None:
    # Prepare
    weights = ArrayRecord({"w": Array(np.ones(2, np.float32))})
    partial = NodeTimings(total=1.0, load=0.5, sign=0.25)  # FedAvg: no label phase

    # Execute
    soft = SoftLabelReply.from_record(make_reply(TIMINGS).to_record(), QUERY)
    bare = SoftLabelReply.from_record(make_reply().to_record(), QUERY)
    trained = TrainReply.from_record(TrainReply(weights, 10, 0.5, timings=partial).to_record())

    # Assert
    assert soft.timings == TIMINGS and bare.timings is None
    assert trained.timings == partial and trained.timings.label is None


def test_timings_attached_after_signing_leave_the_payload_digest_unchanged() -> None:
    # Prepare
    record = make_reply().to_record()
    signed_digest = record_digest(record)

    # Execute
    attach_timings(record, TIMINGS)

    # Assert
    assert record_digest(record) == signed_digest
    assert record_digest(record, exclude=()) != signed_digest  # they are in the message, only not digested


@pytest.mark.parametrize(("fields", "problem"), [
    ({"load": 0.5}, "expected 'total'"),
    ({"total": 1.0, "network": 0.5}, "expected 'total'"),
    ({"total": -1.0}, "total must be finite seconds >= 0"),
    ({"total": 1.0, "train": float("nan")}, "train must be finite seconds >= 0"),
    ({"total": "fast"}, "total must be finite seconds >= 0"),
])
def test_malformed_timings_are_a_format_error_naming_the_field(fields: dict, problem: str) -> None:
    # Prepare
    record = make_reply().to_record()
    record["timings"] = ConfigRecord(fields)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=problem):
        SoftLabelReply.from_record(record, QUERY)


def test_timings_of_a_clock_keep_only_the_node_phases_it_entered() -> None:
    # Execute
    timings = NodeTimings.of({"load": 0.123456, "train": 2.0, "other": 9.0}, total=2.5)

    # Assert
    assert timings == NodeTimings(total=2.5, load=0.1235, train=2.0)
