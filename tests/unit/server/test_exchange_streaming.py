"""Streaming through the one exchange path (server/exchange.py): replies pulled and judged as they arrive, each
accepted soft-label reply folded into the round's running aggregate at once (server/rounds.py `folding`), and the
deadline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from common.aggregation import aggregate
from common.audit.attestation import Attestation
from common.messages import NodeTimings, SoftLabelQuery, SoftLabelReply
from server.audit_trail import AuditTrail
from server.exchange import MAX_PULL_INTERVAL_S, PULL_CHUNK, Phase, ask, exchange, pull_interval_cap
from server.rounds import Pace, query_soft_labels
from server.server_app import collect_and_aggregate

from grid import Answer, MemoryGrid, VirtualClock
from run_fixtures import tiny_cfg

MemoryGridOf = Callable[..., MemoryGrid]
SAMPLES, CLASSES = 6, 3


def reply(kind: str) -> RecordDict:
    return RecordDict({"reply": ConfigRecord({"kind": kind})})


def parse(content: RecordDict) -> str:
    return str(content["reply"]["kind"])


def arriving_after(delays: dict[int, float]) -> Callable[[Message], float]:
    return lambda message: delays[message.metadata.dst_node_id]


def test_replies_are_judged_and_folded_in_arrival_order(memory_grid: MemoryGridOf) -> None:
    # Prepare: node 1 asked first, answers last
    checked: list[int] = []
    folded: list[int] = []

    def check(node: int, content: RecordDict) -> Attestation | None:
        checked.append(node)
        return None

    def fold(node: int, parsed: str) -> str:
        folded.append(node)
        return parsed.upper()

    grid = memory_grid(lambda message: reply("good"), delay=arriving_after({1: 0.5, 2: 0.1, 3: 0.3}))

    # Execute
    result = exchange(grid, ask({node: RecordDict() for node in (1, 2, 3)}, "query.test", "1"), 30.0, parse, check,
                      Phase("test"), 1, fold=fold)

    # Assert
    assert checked == folded == [2, 3, 1]
    assert result.accepted == {2: "GOOD", 3: "GOOD", 1: "GOOD"} and list(result.accepted) == [2, 3, 1]
    assert result.replies == {}  # a folding exchange keeps no reply as received


def soft_labels(node: int) -> np.ndarray:
    return np.random.default_rng(node).dirichlet(np.ones(CLASSES), size=SAMPLES).astype(np.float32)


def institution(bad: dict[int, Answer]) -> Callable[[Message], Answer]:
    """Each node answers the query with its soft labels, except those in `bad`, which answer what is given there."""
    def answer(message: Message) -> Answer:
        node = message.metadata.dst_node_id
        if node in bad:
            return bad[node]
        query = SoftLabelQuery.from_record(message.content)
        return SoftLabelReply(round=query.round, fingerprint=query.fingerprint, codec=query.codec,
                              soft_labels=soft_labels(node), num_examples=10 * node, train_loss=0.4,
                              teacher_accuracy=-1.0, teacher_params=100, teacher_rounds=1).to_record()
    return answer


def test_a_bad_reply_is_dropped_with_its_reason_while_the_others_fold(memory_grid: MemoryGridOf,
                                                                      tmp_path: Path) -> None:
    # Prepare: node 2 sends NaN, node 4 fails; nodes 1 and 3 answer well, 3 before 1
    nan = soft_labels(2)
    nan[0, 0] = np.nan
    query = SoftLabelQuery(round=1, fingerprint="ab" * 32, temperature=2.0, codec="float32", num_classes=CLASSES,
                           sample_ids=np.arange(SAMPLES, dtype=np.int64), evaluate_teacher=False)
    broken = SoftLabelReply(round=1, fingerprint=query.fingerprint, codec="float32", soft_labels=nan, num_examples=20,
                            train_loss=0.4, teacher_accuracy=-1.0, teacher_params=100, teacher_rounds=1).to_record()
    grid = memory_grid(institution({2: broken, 4: Error(code=0, reason="DataError: partition is empty")}), [1, 2, 3, 4],
                       delay=arriving_after({1: 0.4, 2: 0.1, 3: 0.2, 4: 0.3}))
    cfg = tiny_cfg(**{"num-clients": 4, "min-clients": 2, "aggregation": "mean"})

    # Execute
    replies, ensemble = collect_and_aggregate(grid, cfg, AuditTrail.open(cfg, tmp_path / "run", 7), query)

    # Assert: the others' mean, in arrival order, and no reply keeps its rows
    assert list(replies.accepted) == [3, 1]
    assert "NaN" in replies.rejected[2] and replies.rejected[4] == "node error: DataError: partition is empty"
    assert replies.checks == {2: "format", 4: "node-error"}
    np.testing.assert_array_equal(ensemble.probs, aggregate("mean", [soft_labels(3), soft_labels(1)], [30, 10]).probs)
    assert [r.soft_labels.shape for r in replies.accepted.values()] == [(0, CLASSES)] * 2
    assert sorted(replies.payload_digests) == [1, 2, 3] and sorted(replies.uplink_bytes) == [1, 2, 3]


def test_the_deadline_ends_the_exchange_and_names_the_late_and_the_silent(memory_grid: MemoryGridOf,
                                                                         virtual_time: VirtualClock) -> None:
    # Prepare: node 1 answers at once, node 2 after 45 s, node 3 never
    answers: dict[int, Answer] = {1: reply("good"), 2: reply("good")}
    grid = memory_grid(lambda message: answers.get(message.metadata.dst_node_id),
                       delay=arriving_after({1: 0.0, 2: 45.0, 3: 0.0}))

    # Execute
    result = exchange(grid, ask({node: RecordDict() for node in (1, 2, 3)}, "query.test", "1"), 30.0, parse, None,
                      Phase("test"), 1)

    # Assert: stopped at the deadline, not before, not after
    assert result.accepted == {1: "good"}
    assert result.rejected == {2: "no reply within round-timeout=30 s", 3: "no reply within round-timeout=30 s"}
    assert result.checks == {2: "timeout", 3: "timeout"}
    assert virtual_time.time == pytest.approx(30.0)


def test_the_exchange_ends_when_the_last_reply_is_in(memory_grid: MemoryGridOf, virtual_time: VirtualClock) -> None:
    # Prepare
    grid = memory_grid(lambda message: reply("good"), delay=arriving_after({1: 3.3, 2: 0.5}))

    # Execute
    result = exchange(grid, ask({1: RecordDict(), 2: RecordDict()}, "query.test", "1"), 900.0, parse, None,
                      Phase("test"), 1)

    # Assert: the last reply is noticed within the pull interval's cap for one awaited reply (a quarter second)
    assert list(result.accepted) == [2, 1]
    assert 3.3 <= virtual_time.time <= 3.3 + 0.25


@pytest.mark.parametrize(("awaited", "cap"), [(0, 0.25), (1, 0.25), (PULL_CHUNK, 0.25), (PULL_CHUNK + 1, 0.5),
                                              (3 * PULL_CHUNK, 0.75), (1000, MAX_PULL_INTERVAL_S)])
def test_the_pull_interval_grows_with_the_pulls_a_sweep_costs(awaited: int, cap: float) -> None:
    # Execute / Assert: a quarter second per chunk of awaited replies (one pull each), at most a second
    assert pull_interval_cap(awaited) == pytest.approx(cap)


def test_replies_are_pulled_a_chunk_at_a_time(memory_grid: MemoryGridOf) -> None:
    # Prepare: 40 nodes answering at once
    grid = memory_grid(lambda message: reply("good"))

    # Execute
    result = exchange(grid, ask({node: RecordDict() for node in range(1, 41)}, "query.test", "1"), 30.0, parse, None,
                      Phase("test"), 1)

    # Assert: never more than a chunk of replies fetched before they are judged
    assert len(result.accepted) == 40
    assert grid.pulled and max(len(ids) for ids in grid.pulled) == PULL_CHUNK


def test_a_second_reply_for_a_node_is_neither_judged_nor_folded_again(memory_grid: MemoryGridOf) -> None:
    # Prepare: questions without ids, and node 2's reply claims to come from node 1
    def answer(message: Message) -> Answer:
        if message.metadata.dst_node_id == 1:
            return reply("first")
        second = Message(reply("second"), reply_to=message)
        second.metadata.__dict__["_src_node_id"] = 1
        return second

    folded: list[tuple[int, str]] = []
    grid = memory_grid(answer, message_ids=False)

    # Execute
    result = exchange(grid, ask({1: RecordDict(), 2: RecordDict()}, "query.test", "1"), 5.0, parse, None, Phase("test"),
                      1, fold=lambda node, parsed: folded.append((node, parsed)) or parsed)

    # Assert
    assert folded == [(1, "first")] and result.accepted == {1: "first"}
    assert result.checks == {2: "timeout"}


class CountingGrid(MemoryGrid):
    """Records, at each push, how many questions are unanswered (pushed, their reply not yet pulled)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unanswered: list[int] = []

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        self.unanswered.append(len(self._replies))
        return ids


@pytest.mark.parametrize("window", [1, 3, 10])
def test_a_window_keeps_at_most_that_many_questions_unanswered(window: int, server_task: None) -> None:
    # Prepare: 10 nodes, each answering 1 s after its question is pushed
    grid = CountingGrid(lambda message: reply("good"), delay=lambda message: 1.0)

    # Execute
    result = exchange(grid, ask({node: RecordDict() for node in range(1, 11)}, "query.test", "1"), 900.0, parse, None,
                      Phase("test"), 1, window=window)

    # Assert
    assert sorted(result.accepted) == list(range(1, 11))
    assert max(grid.unanswered) == window
    assert [m.metadata.dst_node_id for m in grid.sent] == list(range(1, 11))  # pushed in the order asked


def test_questions_still_queued_at_the_deadline_are_dropped_as_silent(memory_grid: MemoryGridOf) -> None:
    # Prepare: one question at a time, each answered 10 s after it is pushed, a 15 s deadline
    grid = memory_grid(lambda message: reply("good"), delay=lambda message: 10.0)

    # Execute
    result = exchange(grid, ask({node: RecordDict() for node in (1, 2, 3)}, "query.test", "1"), 15.0, parse, None,
                      Phase("test"), 1, window=1)

    # Assert: node 2 was asked at 10 s and could not answer by 15 s; node 3 was never asked
    assert list(result.accepted) == [1]
    assert result.checks == {2: "timeout", 3: "timeout"}
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2]


def test_a_window_wider_than_the_nodes_pushes_every_question_at_once(server_task: None) -> None:
    # Prepare
    grid = CountingGrid(lambda message: reply("good"), delay=lambda message: 1.0)

    # Execute
    result = exchange(grid, ask({node: RecordDict() for node in (1, 2, 3)}, "query.test", "1"), 30.0, parse, None,
                      Phase("test"), 1, window=50)

    # Assert
    assert len(result.accepted) == 3 and grid.unanswered == [3]


def test_the_slowest_nodes_are_asked_first_and_untimed_ones_before_them(server_task: None) -> None:
    # Prepare: nodes 1-4 took 1, 5, 3 s last round; node 4 has never been timed
    pace = Pace({1: 1.0, 2: 5.0, 3: 3.0})

    # Execute
    order = pace.order([1, 2, 3, 4])

    # Assert
    assert order == [4, 2, 3, 1]


def test_a_rounds_timings_order_the_next_rounds_questions(server_task: None) -> None:
    # Prepare: each node reports how long it took (node 2 the slowest); one question at a time
    took = {1: 1.0, 2: 4.0, 3: 2.0}

    def answer(message: Message) -> Answer:
        node = message.metadata.dst_node_id
        query = SoftLabelQuery.from_record(message.content)
        return SoftLabelReply(round=query.round, fingerprint=query.fingerprint, codec=query.codec,
                              soft_labels=soft_labels(node), num_examples=10, train_loss=0.4, teacher_accuracy=-1.0,
                              teacher_params=100, teacher_rounds=1, timings=NodeTimings(total=took[node])).to_record()

    grid = MemoryGrid(answer)
    query = SoftLabelQuery(round=1, fingerprint="ab" * 32, temperature=2.0, codec="float32", num_classes=CLASSES,
                           sample_ids=np.arange(SAMPLES, dtype=np.int64), evaluate_teacher=False)
    pace = Pace()

    # Execute: round 1 in node order, its timings taken in, round 2 asked slowest first
    first = query_soft_labels(grid, pace.order([1, 2, 3]), query, 30.0, window=1)
    pace.update(first.accepted)
    query_soft_labels(grid, pace.order([1, 2, 3]), query, 30.0, window=1)

    # Assert
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 3, 2, 3, 1]
    assert pace.seconds == took
