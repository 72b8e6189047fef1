"""The one exchange path (server/exchange.py): replies judged in one order, each kind worded as before, and
FedAvg's replies through the same judge (server/fedavg.py `JudgedGrid`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.audit.attestation import Attestation
from common.errors import AuditError, MessageFormatError
from common.messages import TrainReply
from server.audit_trail import AuditTrail
from server.exchange import Phase, ask, exchange
from server.fedavg import JudgedGrid, MeasuredFedAvg
from server.rounds import DIGEST, SOFT_LABELS
from server.secure_rounds import secure_phase

from audit_fixtures import FINGERPRINT, RUN_ID, run_config
from grid import Answer, MemoryGrid

MemoryGridOf = Callable[..., MemoryGrid]


def parse(content: RecordDict) -> str:
    kind = content["reply"]["kind"]
    if kind == "bad":
        raise MessageFormatError("reply: kind 'bad'")
    if kind == "broken":
        raise KeyError("kind")
    return str(kind)


def reply(kind: str) -> RecordDict:
    return RecordDict({"reply": ConfigRecord({"kind": kind})})


def test_each_reply_is_judged_node_error_then_attestation_then_schema(memory_grid: MemoryGridOf) -> None:
    # Prepare: node 3's reply fails both its attestation and its schema; node 4 failed on its side
    answers: dict[int, Answer] = {1: reply("good"), 2: reply("bad"), 3: reply("bad"), 4: Error(code=0, reason="boom")}
    checked: list[int] = []

    def check(node: int, content: RecordDict) -> Attestation | None:
        checked.append(node)
        if node == 3:
            raise AuditError("the reply is unsigned", "unsigned")
        return None

    grid = memory_grid(lambda message: answers.get(message.metadata.dst_node_id))
    messages = ask({node: RecordDict() for node in (1, 2, 3, 4, 5)}, "query.test", "7")

    # Execute
    result = exchange(grid, messages, 30.0, parse, check, Phase("test"), 7)

    # Assert
    assert result.accepted == {1: "good"}
    assert result.checks == {2: "format", 3: "unsigned", 4: "node-error", 5: "timeout"}
    assert result.rejected[3] == "AuditError: the reply is unsigned" and result.rejected[4] == "node error: boom"
    assert checked == [1, 2, 3]  # never the error reply
    assert list(result.replies) == [1, 2, 3, 4] and set(result.uplink_bytes) == {1, 2, 3}


@pytest.mark.parametrize(("phase", "bad", "broken", "silent"), [
    (SOFT_LABELS, "MessageFormatError: reply: kind 'bad'", "unreadable reply (KeyError: 'kind')",
     "no reply within round-timeout=30 s"),
    (DIGEST, "unreadable digest reply (MessageFormatError: reply: kind 'bad')", "unreadable digest reply (KeyError: 'kind')",
     "no digest reply within round-timeout=30 s"),
    (secure_phase("secagg-keys"), "MessageFormatError: reply: kind 'bad'", "KeyError: 'kind'", "no reply within round-timeout=30 s"),
], ids=["soft-labels", "digest", "secagg"])
def test_each_kind_of_exchange_keeps_its_wording(memory_grid: MemoryGridOf, phase: Phase, bad: str, broken: str,
                                                 silent: str) -> None:
    # Prepare
    answers = {1: reply("bad"), 2: reply("broken")}
    grid = memory_grid(lambda message: answers.get(message.metadata.dst_node_id))

    # Execute
    result = exchange(grid, ask({1: RecordDict(), 2: RecordDict(), 3: RecordDict()}, "query.test", "1"), 30.0, parse,
                      None, phase, 1)

    # Assert
    assert result.rejected == {1: bad, 2: broken, 3: silent}
    assert set(result.uplink_bytes) == ({1, 2} if phase.counts_uplink else set())


def weights(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 2), value, dtype=np.float32))})


def test_fedavg_replies_pass_the_same_judge_and_only_good_ones_are_averaged(memory_grid: MemoryGridOf, tmp_path: Path,
                                                                          run_config_mapping: dict[str, Any]) -> None:
    # Prepare: nodes 1 and 2 train properly, 3 sends no weight key, 4 fails, 5 is silent (a run without an allow-list:
    # replies are logged, not signature-checked; tests/unit/server/test_fedavg.py checks signed ones)
    answers: dict[int, Answer] = {
        1: TrainReply(weights=weights(1.0), num_examples=10, train_loss=0.5).to_record(),
        2: TrainReply(weights=weights(4.0), num_examples=30, train_loss=0.25).to_record(),
        3: RecordDict({"arrays": weights(100.0), "metrics": MetricRecord({"loss": 0.1})}),
        4: Error(code=0, reason="RuntimeError: out of memory"),
    }
    trail = AuditTrail.open(run_config(run_config_mapping, ""), tmp_path / "run", RUN_ID)
    strategy = MeasuredFedAvg(trail, FINGERPRINT, round_offset=2, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=5,
                              min_available_nodes=5)
    grid = JudgedGrid(memory_grid(lambda message: answers.get(message.metadata.dst_node_id), nodes=[1, 2, 3, 4, 5]),
                      strategy)

    # Execute
    messages = list(strategy.configure_train(1, weights(0.0), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=30.0))
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    judged = strategy.exchanges[3]  # the run's round: 2 done before a resume
    assert sorted(judged.accepted) == [1, 2] and sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert (judged.accepted[1].num_examples, judged.accepted[2].train_loss) == (10, 0.25)
    assert judged.checks == {3: "format", 4: "node-error", 5: "timeout"}
    assert judged.rejected[3] == "MessageFormatError: fedavg reply: expected one MetricRecord holding 'num-examples'"
    assert strategy.replied == {3: 2} and set(strategy.uplink[3]) == {"1", "2", "3"}
    assert strategy.downlink[3] == judged.downlink_bytes > 0
    assert arrays is not None and np.allclose(arrays["w"].numpy(), (10 * 1.0 + 30 * 4.0) / 40)
    assert list(grid.send_and_receive([], timeout=30.0)) == []  # the evaluate step, with fraction-evaluate 0


def test_an_exchange_without_messages_sends_nothing(memory_grid: MemoryGridOf) -> None:
    # Prepare
    grid = memory_grid(lambda message: pytest.fail("nothing should be sent"))

    nothing: list[Message] = []

    # Execute
    result = exchange(grid, nothing, 30.0, parse, None, SOFT_LABELS, 1)

    # Assert
    assert (result.accepted, result.rejected, result.downlink_bytes, grid.sent) == ({}, {}, 0, [])
