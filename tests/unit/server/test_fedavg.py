"""The FedAvg baseline's replies are audited like soft labels (server/fedavg.py): each reply's attestation is checked
before Flower's FedAvg averages it, every reply and each round's average go into the ledger, and the ledger verifies
with the institutions' release logs. Real keys, real signatures, Flower's own FedAvg; only the training is left out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.release import Identity, sign_and_log
from common.audit import kinds
from common.audit.verify import verify_ledger
from common.messages import TrainInstruction, TrainReply
from server.audit_trail import LEDGER, AuditTrail
from server.fedavg import JudgedGrid, MeasuredFedAvg

from audit_fixtures import FINGERPRINT, RUN_ID, cosigned, make_identity, run_config, witness_ledger_end, write_allow_list_for
from grid import Answer, MemoryGrid

NODES = (1, 2, 3)
EXAMPLES = {1: 10, 2: 30, 3: 60}


def weights(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 2), value, dtype=np.float32)), "b": Array(np.arange(3, dtype=np.float32) * value)})


def trained(node: int) -> RecordDict:
    """What node `node` sends back: its trained weights and counts, unsigned."""
    return TrainReply(weights=weights(float(node)), num_examples=EXAMPLES[node], train_loss=0.1 * node).to_record()


def signed(identity: Identity, message: Message, node: int, record: RecordDict | None = None, round_: int | None = None) -> RecordDict:
    """`record` (default: the node's honest reply) signed and logged by `identity`, as the ClientApp's fedavg handler does."""
    instruction = TrainInstruction.from_record(message.content)
    reply = cosigned(identity, message, trained(node) if record is None else record)
    return sign_and_log(identity, reply, message.content, run_id=RUN_ID,
                        round_=instruction.server_round if round_ is None else round_, node_id=node, fingerprint=FINGERPRINT,
                        kind=kinds.FEDAVG_PAYLOAD)


def tampered(record: RecordDict) -> RecordDict:
    """The signed reply with its weights changed after signing (the attestation kept)."""
    record["arrays"] = weights(1000.0)
    return record


class Audited:
    """A coordinator with an allow-list of three institutions, its ledger, and one FedAvg round to run."""

    def __init__(self, root: Path, mapping: dict[str, Any], memory_grid: Callable[..., MemoryGrid]) -> None:
        self.sites = {node: make_identity(root / "sites", f"institution-{node}") for node in NODES}
        self.allow_list = write_allow_list_for(root / "allow-list.toml", [s.signer for s in self.sites.values()])
        self.folder = root / "run"
        self.trail = AuditTrail.open(run_config({**mapping, "method": "fedavg"}, root / "allow-list.toml"), self.folder, RUN_ID)
        self.strategy = MeasuredFedAvg(self.trail, FINGERPRINT, fraction_train=1.0, fraction_evaluate=0.0,
                                       min_train_nodes=len(NODES), min_available_nodes=len(NODES))
        self.memory_grid = memory_grid

    def round(self, answer: Callable[[Message], Answer]) -> tuple[ArrayRecord | None, list[Message]]:
        """One FedAvg round as Flower's loop drives it: configure, send and judge, aggregate."""
        grid = JudgedGrid(self.memory_grid(answer, nodes=list(NODES)), self.strategy)
        replies = list(grid.send_and_receive(list(self.strategy.configure_train(1, weights(0.0), ConfigRecord(), grid)),
                                             timeout=30.0))
        arrays, _ = self.strategy.aggregate_train(1, replies)
        return arrays, replies

    def entries(self, kind: str) -> list[dict[str, Any]]:
        return [entry["body"] for entry in self.trail.ledger.entries() if entry["kind"] == kind]

    def verify(self) -> Any:
        student = self.folder / "student.safetensors"
        student.write_bytes(b"student weights")
        self.trail.checkpoint(1, student, 0.5)
        self.trail.finished(1, student)
        answered = {node: site for node, site in self.sites.items() if node in self.trail.bindings}
        witness_ledger_end(self.trail.ledger, answered, self.trail.witnessing)
        key = (self.folder / "coordinator.pub").read_text(encoding="ascii").strip()
        return verify_ledger(self.folder / LEDGER, coordinator_key=key, allow_list=self.allow_list,
                             client_logs=[site.release_log for site in self.sites.values() if site.release_log.exists()])


@pytest.fixture
def audited(tmp_path: Path, run_config_mapping: dict[str, Any], memory_grid: Callable[..., MemoryGrid]) -> Audited:
    return Audited(tmp_path, run_config_mapping, memory_grid)


def test_signed_replies_are_averaged_exactly_as_flower_averages_unsigned_ones(audited: Audited, server_task: None) -> None:
    # Prepare: Flower's own FedAvg on the same replies, without attestations
    reference = FedAvg(weighted_by_key=TrainReply.weight_key).aggregate_train(
        1, [Message(trained(node), dst_node_id=node, message_type="train") for node in NODES])[0]

    # Execute
    arrays, replies = audited.round(lambda message: signed(audited.sites[message.metadata.dst_node_id], message,
                                                           message.metadata.dst_node_id))

    # Assert: every reply accepted, and the average bit for bit the unsigned one
    assert sorted(audited.strategy.exchanges[1].accepted) == list(NODES) and len(replies) == 3
    assert arrays is not None and reference is not None
    for name in ("w", "b"):
        assert np.array_equal(arrays[name].numpy(), reference[name].numpy()), name
    assert np.allclose(arrays["w"].numpy(), (10 * 1 + 30 * 2 + 60 * 3) / 100)


def test_each_reply_and_the_average_are_in_the_ledger_which_verifies_with_the_release_logs(audited: Audited) -> None:
    # Execute
    audited.round(lambda message: signed(audited.sites[message.metadata.dst_node_id], message, message.metadata.dst_node_id))
    check = audited.verify()

    # Assert
    [opened] = audited.entries(kinds.EXCHANGE_OPENED)
    assert (opened["phase"], opened["round"], opened["nodes"]) == (kinds.FEDAVG_PHASE, 1, ["1", "2", "3"])
    accepted = audited.entries(kinds.REPLY_ACCEPTED)
    assert [(b["phase"], b["node_id"], b["institution_id"]) for b in accepted] == \
           [(kinds.FEDAVG_PHASE, str(n), f"institution-{n}") for n in NODES]
    assert all(b["attestation"] is not None and '"kind":"fedavg-weights"' in b["attestation"]["statement"] for b in accepted)
    assert all("model weights trained on private data (FedAvg baseline)" in b["attestation"]["statement"] for b in accepted)
    [aggregated] = audited.entries(kinds.AGGREGATED)
    assert (aggregated["rule"], aggregated["nodes"], aggregated["institutions"]) == \
           ("fedavg", ["1", "2", "3"], ["institution-1", "institution-2", "institution-3"])
    assert len(aggregated["weights_sha256"]) == 64
    assert check.ok, [str(p) for p in check.problems]
    # opened, the round's head cosigned, release, then the closing witness: cosigned, receipt
    assert sum(count for name, count in check.checked.items() if name.endswith("release-log.jsonl")) == 3 * 5


def test_unsigned_tampered_and_misdated_replies_are_rejected_before_averaging_and_recorded(audited: Audited) -> None:
    # Prepare: node 1 honest; node 2 unsigned; node 3 signs, then its weights are changed (or it signs another round)
    def answer(message: Message) -> Answer:
        node = message.metadata.dst_node_id
        if node == 2:
            return trained(2)
        if node == 3:
            return tampered(signed(audited.sites[3], message, 3))
        return signed(audited.sites[1], message, 1)

    # Execute
    arrays, replies = audited.round(answer)
    check = audited.verify()

    # Assert: only node 1 is averaged, the others' checks are in the ledger
    judged = audited.strategy.exchanges[1]
    assert sorted(judged.accepted) == [1] and [r.metadata.src_node_id for r in replies] == [1]
    assert judged.checks == {2: "unsigned", 3: "digest"}
    assert arrays is not None and np.array_equal(arrays["w"].numpy(), weights(1.0)["w"].numpy())
    rejected = {b["node_id"]: (b["phase"], b["check"]) for b in audited.entries(kinds.REPLY_REJECTED)}
    assert rejected == {"2": (kinds.FEDAVG_PHASE, "unsigned"), "3": (kinds.FEDAVG_PHASE, "digest")}
    assert audited.entries(kinds.AGGREGATED)[0]["nodes"] == ["1"]
    assert check.ok, [str(p) for p in check.problems]  # node 3's rejected release is in its log and in the ledger


def test_a_reply_signed_for_another_round_is_rejected_on_its_statement(audited: Audited) -> None:
    # Execute
    audited.round(lambda message: signed(audited.sites[message.metadata.dst_node_id], message, message.metadata.dst_node_id,
                                         round_=2 if message.metadata.dst_node_id == 3 else None))

    # Assert
    judged = audited.strategy.exchanges[1]
    assert sorted(judged.accepted) == [1, 2] and judged.checks == {3: "statement"}
    assert "round = 2, observed 1" in judged.rejected[3]
