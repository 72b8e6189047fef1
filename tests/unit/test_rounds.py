"""The server's judgement of a round's replies: bad ones are dropped with a reason, never raised."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from common.messages import SoftLabelQuery, SoftLabelReply
from server.rounds import judge_replies

FINGERPRINT = "ab" * 32


def make_query() -> SoftLabelQuery:
    return SoftLabelQuery(round=1, fingerprint=FINGERPRINT, temperature=2.0, codec="float16", num_classes=3,
                          sample_ids=np.arange(4, dtype=np.int64), evaluate_teacher=False)


def reply_content(probs: np.ndarray, fingerprint: str = FINGERPRINT) -> RecordDict:
    return SoftLabelReply(round=1, fingerprint=fingerprint, codec="float16", soft_labels=probs, num_examples=10,
                          train_loss=0.5, teacher_accuracy=-1.0, teacher_params=100, teacher_rounds=1).to_record()


def test_bad_replies_are_dropped_with_reasons_and_good_ones_kept() -> None:
    # Prepare
    good = np.full((4, 3), 1 / 3, dtype=np.float32)
    nan = good.copy()
    nan[0, 0] = np.nan
    missing_key = reply_content(good)
    del missing_key["metrics"]
    answers = [
        (1, None, reply_content(good)),
        (2, None, reply_content(nan)),
        (3, None, reply_content(np.full((4, 2), 0.5, dtype=np.float32))),
        (4, None, reply_content(good, fingerprint="cd" * 32)),
        (5, None, missing_key),
        (6, "DataError: partition is empty", None),
        (7, None, RecordDict({"release": ConfigRecord({"round": "one"})})),
    ]

    # Execute
    result = judge_replies(make_query(), [1, 2, 3, 4, 5, 6, 7, 8], answers, timeout=30)

    # Assert
    assert list(result.accepted) == [1]
    assert "NaN" in result.rejected[2]
    assert "expected shape (4, 3), got (4, 2)" in result.rejected[3]
    assert "fingerprint mismatch" in result.rejected[4]
    assert "missing record 'metrics'" in result.rejected[5]
    assert result.rejected[6] == "node error: DataError: partition is empty"
    assert "MessageFormatError" in result.rejected[7]
    assert "no reply within round-timeout=30 s" in result.rejected[8]
    assert set(result.uplink_bytes) == {1, 2, 3, 4, 5, 7}
    assert result.downlink_bytes > 0


def test_an_error_reply_the_superlink_makes_for_a_silent_node_is_that_nodes() -> None:
    # Prepare: two questions with ids (as the grid sets them when pushing); node 22 went silent and
    # the SuperLink answered for it (source 1, the SuperLink), node 11 answered itself
    from types import SimpleNamespace as NS

    from server.rounds import send_and_receive

    asked = [NS(metadata=NS(message_id="q-11", dst_node_id=11)), NS(metadata=NS(message_id="q-22", dst_node_id=22))]
    replies = [NS(metadata=NS(src_node_id=11, reply_to_message_id="q-11")),
               NS(metadata=NS(src_node_id=1, reply_to_message_id="q-22"))]
    grid = NS(send_and_receive=lambda messages, timeout: replies)

    # Execute
    pairs = send_and_receive(grid, asked, 5.0)

    # Assert
    assert [(node, reply) for node, reply in pairs] == [(11, replies[0]), (22, replies[1])]


def test_questions_without_ids_fall_back_to_each_replys_source() -> None:
    from types import SimpleNamespace as NS

    from server.rounds import send_and_receive

    asked = [NS(metadata=NS(message_id="", dst_node_id=11)), NS(metadata=NS(message_id="", dst_node_id=22))]
    replies = [NS(metadata=NS(src_node_id=22, reply_to_message_id=""))]

    assert send_and_receive(NS(send_and_receive=lambda m, timeout: replies), asked, 5.0) == [(22, replies[0])]
