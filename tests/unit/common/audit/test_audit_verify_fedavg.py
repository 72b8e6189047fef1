"""`fedstill audit verify` and the compliance report on FedAvg runs: the weights each institution released are
cross-checked against its release log, and a ledger that files them under the wrong phase, in a run of another
method, or with another round's query is caught. Real keys and signatures; the ledger is written by the real
audit trail, made to lie where a test says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from client.release import sign_and_log
from common.audit import kinds
from common.audit.report import build_report
from common.audit.verify import Verification, verify_ledger
from common.config import default_run_config
from common.messages import TrainInstruction, TrainReply, read_attestation, record_digest
from server.audit_trail import LEDGER, AuditTrail
from server.exchange import Exchange

from audit_fixtures import FINGERPRINT, RUN_ID, make_identity, run_config, witness_ledger_end, write_allow_list_for

NODES = (101, 102)


def weights(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((3,), value, dtype=np.float32))})


def record_run(root: Path, *, method: str = "fedavg", phase: str = kinds.FEDAVG_PHASE, signed_query_round: int = 1) -> Path:
    """One FedAvg round recorded by the audit trail: both institutions' signed weights accepted (filed under `phase`;
    node 102 signs the query of round `signed_query_round`), averaged, checkpointed; the run folder."""
    sites = {node: make_identity(root / "sites", f"institution-{i}") for i, node in enumerate(NODES)}
    write_allow_list_for(root / "allow-list.toml", [site.signer for site in sites.values()])
    folder = root / "run"
    trail = AuditTrail.open(run_config({**default_run_config(), "method": method}, root / "allow-list.toml"), folder, RUN_ID)
    query = TrainInstruction(weights(0.0), server_round=1).to_record()
    trail.exchange_opened(kinds.FEDAVG_PHASE, 1, dict.fromkeys(NODES, query))
    judged: Exchange[TrainReply] = Exchange()
    for node, site in sites.items():
        asked = query if node == 101 else TrainInstruction(weights(0.0), server_round=signed_query_round).to_record()
        content = sign_and_log(site, TrainReply(weights(float(node)), 10, 0.5).to_record(), asked, run_id=RUN_ID, round_=1,
                               node_id=node, fingerprint=FINGERPRINT, kind=kinds.FEDAVG_PAYLOAD)
        judged.accepted[node] = TrainReply.from_record(content)
        judged.attestations[node] = read_attestation(content)
        judged.payload_digests[node] = record_digest(content)
    trail.record_replies(1, judged, phase)
    trail.weights_aggregated(1, list(NODES), weights(101.5))
    student = folder / "student.safetensors"
    student.write_bytes(b"averaged weights")
    trail.checkpoint(1, student, 0.5)
    trail.finished(1, student)
    witness_ledger_end(trail.ledger, sites, trail.witnessing)
    return folder


def verify(folder: Path) -> Verification:
    return verify_ledger(folder / LEDGER, client_logs=sorted((folder.parent / "sites").glob("*/release-log.jsonl")))


def problems(check: Verification) -> list[tuple[str, str]]:
    return [(p.check, p.message) for p in check.problems]


def test_an_honest_fedavg_ledger_verifies_with_the_release_logs(tmp_path: Path) -> None:
    # Prepare
    folder = record_run(tmp_path)

    # Execute
    check = verify(folder)

    # Assert
    assert check.ok, problems(check)
    assert sum(n for name, n in check.checked.items() if name.endswith("release-log.jsonl")) == 2 * 4  # opened, release,
    # then the closing witness: cosigned, receipt


def test_fedavg_weights_filed_as_soft_labels_are_caught(tmp_path: Path) -> None:
    # Execute
    check = verify(record_run(tmp_path, phase="soft-labels"))

    # Assert: the phase does not fit the run, the payload does not fit the phase; once per reply
    found = problems(check)
    assert [c for c, _ in found].count("phase") == 2 and [c for c, _ in found].count("attestation") == 2
    assert any("states a payload of kind 'fedavg-weights', accepted in phase 'soft-labels'" in m for _, m in found)


def test_weights_released_in_a_distillation_run_are_caught(tmp_path: Path) -> None:
    # Execute
    check = verify(record_run(tmp_path, method="distill"))

    # Assert
    assert [c for c, _ in problems(check)] == ["phase", "phase"]
    assert "a reply of phase 'fedavg' in a run of method 'distill'" in check.problems[0].message


def test_a_reply_signed_for_another_query_is_caught(tmp_path: Path) -> None:
    # Execute: node 102 signed round 2's question, and the coordinator accepted it in round 1
    check = verify(record_run(tmp_path, signed_query_round=2))

    # Assert
    [problem] = check.problems
    assert (problem.check, problem.seq is not None) == ("attestation", True)
    assert "signed for query" in problem.message and "the round's query is" in problem.message


def test_the_report_counts_fedavg_rounds_and_releases(tmp_path: Path) -> None:
    # Prepare
    folder = record_run(tmp_path)
    logs = sorted((folder.parent / "sites").glob("*/release-log.jsonl"))

    # Execute
    report: dict[str, Any] = build_report([folder / LEDGER], logs)

    # Assert
    assert report["verified"] and report["rounds_axis"] == [["run", 1]]
    [run] = report["runs"]
    assert (run["method"], run["rounds_opened"], run["rounds_aggregated"]) == ("fedavg", 1, 1)
    institution = report["institutions"]["institution-0"]
    assert institution["releases_accepted"] == 1 and institution["per_round"][0]["phase"] == kinds.FEDAVG_PHASE
    assert "model weights trained on private data (FedAvg baseline)" in institution["data_categories"]
