"""Witnessing the ledger (server.witness, client.witness, common.audit.witness): an honest coordinator's heads are
cosigned round after round with receipts for every accepted reply; a rollback, a fork, another coordinator key or a
bad receipt is refused by the institution and kept in its release log."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from client.witness import last_cosigned, witness
from common.audit import kinds
from common.audit.keys import Signer
from common.audit.ledger import Ledger
from common.audit.witness import Cosignature, SignedHead, WitnessError, WitnessRequest
from server.witness import Witnessing

from audit_fixtures import AuditedRun, audited_run

NODES = (101, 102)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> AuditedRun:
    return audited_run(tmp_path_factory.mktemp("recorded"))


@pytest.fixture
def run(recorded: AuditedRun, tmp_path: Path) -> AuditedRun:
    return recorded.copy_to(tmp_path / "copy")


def institutions(run: AuditedRun) -> dict[int, str]:
    return {node: identity.signer.name for node, identity in run.identities.items()}


def coordinator_ledger(run: AuditedRun) -> Ledger:
    return Ledger.open(run.ledger, run.coordinator)


def log_kinds(run: AuditedRun, node: int) -> list[str]:
    return [json.loads(line)["kind"] for line in run.identities[node].release_log.read_text().splitlines()]


def test_an_honest_coordinator_is_witnessed_with_a_receipt_for_every_accepted_reply(run: AuditedRun) -> None:
    # Prepare: the recorded run's ledger, its closing witness done
    desk = Witnessing.of(coordinator_ledger(run), run.allow_list, institutions(run))
    size = len(run.lines())

    # Execute: two more heads, each witnessed by both institutions, the ledger growing between them
    for _ in range(2):
        requests = desk.requests(list(NODES))
        for node in NODES:
            cosignature = witness(requests[node], run.identities[node])
            assert desk.record(node, run.identities[node].signer.name, cosignature.as_dict()) is None
        desk.ledger.append(kinds.RUN_FINISHED, {"status": "completed", "rounds": 2})

    # Assert: the recorded run's closing witness receipted both soft-label replies of each node; the two heads
    # after it receipted its witness replies, then proved consistency (4 entries: head, 2 cosignatures, finish)
    entries = desk.ledger.entries()
    heads = [e["body"] for e in entries if e["kind"] == kinds.TREE_HEAD]
    assert [h["size"] for h in heads[-2:]] == [size, size + 4] and len(heads) == 3
    assert [e["body"]["institution_id"] for e in entries if e["kind"] == kinds.COSIGNED][-4:] == \
        ["institution-0", "institution-1"] * 2
    for node in NODES:
        receipts = [json.loads(line)["body"] for line in run.identities[node].release_log.read_text().splitlines()
                    if json.loads(line)["kind"] == kinds.RECEIPT]
        assert [(r["entry"]["body"]["round"], r["entry"]["body"]["phase"]) for r in receipts] == \
            [(1, "soft-labels"), (2, "soft-labels"), (2, "witness")]
        assert all(r["entry"]["body"]["node_id"] == str(node) for r in receipts)
        last, key = last_cosigned(Ledger.open(run.identities[node].release_log, run.identities[node].signer), heads[0]["ledger"])
        assert last is not None and last.size == size + 4 and key == run.coordinator.public


def test_a_cosignature_lost_on_the_way_back_costs_nothing(run: AuditedRun) -> None:
    # Prepare: node 101 cosigns the first head, but the coordinator never records it
    desk = Witnessing.of(coordinator_ledger(run), run.allow_list, institutions(run))
    witness(desk.requests([101])[101], run.identities[101])
    desk.ledger.append(kinds.RUN_FINISHED, {"status": "completed", "rounds": 2})

    # Execute: the next request proves consistency from every head since the last cosignature recorded
    cosignature = witness(desk.requests([101])[101], run.identities[101])

    # Assert
    assert desk.record(101, "institution-0", cosignature.as_dict()) is None


def test_a_rollback_is_refused_and_kept_in_the_release_log(run: AuditedRun) -> None:
    # Prepare: node 101 cosigned a head; the coordinator then shows it an older, smaller head
    desk = Witnessing.of(coordinator_ledger(run), run.allow_list, institutions(run))
    size = len(run.lines())
    older = desk.requests([101])[101]
    desk.ledger.append(kinds.RUN_FINISHED, {"status": "completed", "rounds": 2})
    witness(desk.requests([101])[101], run.identities[101])

    # Execute / Assert
    with pytest.raises(WitnessError, match=f"rollback: the tree head has {size} entries, this institution cosigned {size + 2}"):
        witness(older, run.identities[101])
    assert log_kinds(run, 101)[-1] == kinds.WITNESS_REFUSED


def test_a_fork_is_refused(run: AuditedRun, tmp_path: Path) -> None:
    # Prepare: node 101 cosigned a head; the coordinator rewrites an early entry (keeping the ledger id) and signs
    # a longer head over the rewritten history
    desk = Witnessing.of(coordinator_ledger(run), run.allow_list, institutions(run))
    size = len(run.lines())
    witness(desk.requests([101])[101], run.identities[101])
    lines = run.ledger.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"round":1', b'"round":7')
    forked = tmp_path / "forked.jsonl"
    forked.write_bytes(b"".join(lines))
    fork = Witnessing.of(Ledger.open(forked, run.coordinator), run.allow_list, institutions(run))
    fork.ledger.append(kinds.RUN_FINISHED, {"status": "completed", "rounds": 2})

    # Execute / Assert
    with pytest.raises(WitnessError, match=f"fork: the tree head of size {size + 2} does not extend the head of size {size}"):
        witness(fork.requests([101])[101], run.identities[101])


def test_a_head_signed_by_another_coordinator_key_is_refused(run: AuditedRun) -> None:
    # Prepare
    desk = Witnessing.of(coordinator_ledger(run), run.allow_list, institutions(run))
    witness(desk.requests([101])[101], run.identities[101])
    request = desk.requests([101])[101]
    intruder = Signer.generate(kinds.COORDINATOR)
    forged = dataclasses.replace(request, head=SignedHead.sign(request.head.head, intruder))

    # Execute / Assert: the key first seen for this ledger is pinned; node config's pin wins over it
    with pytest.raises(WitnessError, match="signed by another key than the coordinator's this institution pinned"):
        witness(forged, run.identities[101])
    with pytest.raises(WitnessError, match="signed by another key"):
        witness(request, run.identities[101], pinned=intruder.public)


def test_a_receipt_for_another_institutions_reply_or_not_in_the_head_is_refused(run: AuditedRun) -> None:
    # Prepare
    desk = Witnessing.of(coordinator_ledger(run), run.allow_list, institutions(run))
    requests = desk.requests(list(NODES))
    theirs = dataclasses.replace(requests[101], receipts=requests[102].receipts)
    receipt = requests[101].receipts[0]
    moved = dataclasses.replace(requests[101], receipts=(dataclasses.replace(receipt, seq=receipt.seq + 1),))

    # Execute / Assert
    with pytest.raises(WitnessError, match="a receipt is for a reply of 'institution-1', not of this institution"):
        witness(theirs, run.identities[101])
    with pytest.raises(WitnessError, match=f"the receipt for entry {receipt.seq + 1} does not prove it is in the tree head"):
        witness(moved, run.identities[101])


def test_the_coordinator_refuses_a_cosignature_it_cannot_check(run: AuditedRun) -> None:
    # Prepare
    desk = Witnessing.of(coordinator_ledger(run), run.allow_list, institutions(run))
    request = desk.requests([101])[101]
    good = witness(request, run.identities[101])
    stranger = Cosignature.sign(request.head.head, Signer.generate("institution-0"))

    # Execute / Assert
    assert desk.record(101, "institution-0", None) == \
        "the reply carries no cosignature of the tree head it was asked to witness"
    assert "a key the allow-list does not give it" in str(desk.record(101, "institution-0", stranger.as_dict()))
    assert "cosigned as 'institution-0', the reply is signed by 'institution-1'" == \
        desk.record(101, "institution-1", good.as_dict())
    other = dataclasses.replace(good, head=dataclasses.replace(good.head, size=3))
    assert "signature" in str(desk.record(101, "institution-0", other.as_dict()))
    assert WitnessRequest.from_json(request.to_json()) == request
