"""The server's judgement of a round's replies: bad ones are dropped with a reason, never raised."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from common.messages import SoftLabelQuery, SoftLabelReply, record_nbytes
from server.exchange import collect
from server.rounds import query_soft_labels

from grid import Answer, MemoryGrid

FINGERPRINT = "ab" * 32
MemoryGridOf = Callable[..., MemoryGrid]


def make_query() -> SoftLabelQuery:
    return SoftLabelQuery(round=1, fingerprint=FINGERPRINT, temperature=2.0, codec="float16", num_classes=3,
                          sample_ids=np.arange(4, dtype=np.int64), evaluate_teacher=False)


def reply_content(probs: np.ndarray, fingerprint: str = FINGERPRINT) -> RecordDict:
    return SoftLabelReply(round=1, fingerprint=fingerprint, codec="float16", soft_labels=probs, num_examples=10,
                          train_loss=0.5, teacher_accuracy=-1.0, teacher_params=100, teacher_rounds=1).to_record()


def test_bad_replies_are_dropped_with_reasons_and_good_ones_kept(memory_grid: MemoryGridOf) -> None:
    # Prepare
    good = np.full((4, 3), 1 / 3, dtype=np.float32)
    nan = good.copy()
    nan[0, 0] = np.nan
    missing_key = reply_content(good)
    del missing_key["metrics"]
    answers: dict[int, Answer] = {
        1: reply_content(good),
        2: reply_content(nan),
        3: reply_content(np.full((4, 2), 0.5, dtype=np.float32)),
        4: reply_content(good, fingerprint="cd" * 32),
        5: missing_key,
        6: Error(code=0, reason="DataError: partition is empty"),
        7: RecordDict({"release": ConfigRecord({"round": "one"})}),
    }
    grid = memory_grid(lambda message: answers.get(message.metadata.dst_node_id))

    # Execute
    result = query_soft_labels(grid, [1, 2, 3, 4, 5, 6, 7, 8], make_query(), timeout=30)

    # Assert
    assert list(result.accepted) == [1]
    assert "NaN" in result.rejected[2]
    assert "expected shape (4, 3), got (4, 2)" in result.rejected[3]
    assert "fingerprint mismatch" in result.rejected[4]
    assert "missing record 'metrics'" in result.rejected[5]
    assert result.rejected[6] == "node error: DataError: partition is empty"
    assert "MessageFormatError" in result.rejected[7]
    assert result.rejected[8] == "no reply within round-timeout=30 s"
    assert result.checks == {2: "format", 3: "format", 4: "format", 5: "format", 6: "node-error", 7: "format",
                             8: "timeout"}
    assert set(result.uplink_bytes) == {1, 2, 3, 4, 5, 7}
    assert result.downlink_bytes == 8 * record_nbytes(make_query().to_record()) > 0
    assert [m.metadata.group_id for m in grid.sent] == ["1"] * 8


def test_an_error_reply_the_superlink_makes_for_a_silent_node_is_that_nodes(memory_grid: MemoryGridOf) -> None:
    # Prepare: node 22 went silent and the SuperLink answered for it (source 1, the SuperLink); node 11 answered itself
    def answer(message: Message) -> Answer:
        if message.metadata.dst_node_id == 11:
            return RecordDict()
        reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = 1
        return reply

    grid = memory_grid(answer)
    asked = [Message(RecordDict(), dst_node_id=node, message_type="query.soft_labels") for node in (11, 22)]

    # Execute
    pairs = collect(grid, asked, 5.0)

    # Assert
    assert [(node, reply.metadata.src_node_id) for node, reply in pairs] == [(11, 11), (22, 1)]


def test_questions_without_ids_fall_back_to_each_replys_source(memory_grid: MemoryGridOf) -> None:
    # Prepare
    grid = memory_grid(lambda message: RecordDict() if message.metadata.dst_node_id == 22 else None, message_ids=False)
    asked = [Message(RecordDict(), dst_node_id=node, message_type="query.soft_labels") for node in (11, 22)]

    # Execute
    pairs = collect(grid, asked, 5.0)

    # Assert
    assert [node for node, _ in pairs] == [22]


@pytest.mark.parametrize(("window", "waves"), [(0, 1), (2, 3), (5, 1)])
def test_a_round_with_a_window_asks_every_node_a_few_at_a_time(memory_grid: MemoryGridOf, virtual_time, window: int,
                                                               waves: int) -> None:
    # Prepare: five nodes, each answering 1 s after it is asked
    good = np.full((4, 3), 1 / 3, dtype=np.float32)
    grid = memory_grid(lambda message: reply_content(good), delay=lambda message: 1.0)

    # Execute
    result = query_soft_labels(grid, [1, 2, 3, 4, 5], make_query(), timeout=30, window=window)

    # Assert: `waves` one-second waves of questions (each seen at the next pull, at most 1.5 s after it was asked)
    assert sorted(result.accepted) == [1, 2, 3, 4, 5]
    assert waves <= virtual_time.time <= 1.5 * waves


def test_every_node_is_sent_the_same_query_record(memory_grid: MemoryGridOf) -> None:
    # Prepare
    good = np.full((4, 3), 1 / 3, dtype=np.float32)
    grid = memory_grid(lambda message: reply_content(good))

    # Execute
    result = query_soft_labels(grid, [1, 2, 3], make_query(), timeout=30)

    # Assert: one record (its sample ids) for all, not a copy per node
    assert len(result.accepted) == 3
    assert len({id(message.content) for message in grid.sent}) == 1
