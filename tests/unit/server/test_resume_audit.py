"""A run resumed from its checkpoint, in the record: the abandoned attempt stays in the chain, `run-resumed`
says so, the verifier and the report tell it apart, and the privacy section counts each round once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.audit import kinds
from common.audit.report import build_report
from common.audit.verify import abandoned_entries, verify_ledger
from server.audit_trail import AuditTrail
from server.results.privacy import privacy_section

from audit_fixtures import (
    NUM_SAMPLES,
    RUN_ID,
    AuditedRun,
    judge,
    make_identity,
    make_query,
    run_config,
    signed_reply,
    witness_ledger_end,
    write_allow_list_for,
)

NEW_RUN_ID = RUN_ID - 1000
NODES = (101, 102)


def play_round(trail: AuditTrail, run: AuditedRun, round_: int, run_id: int, *, finish: bool = True) -> dict | None:
    """One round as the server plays it; `finish=False` stops after node 101's reply is recorded (the kill)."""
    query = make_query(round_)
    trail.round_opened(query, query.to_record(), list(NODES))
    answers = [(node, None, signed_reply(identity, query, node, run_id=run_id)) for node, identity in run.identities.items()]
    replies = judge(trail, query, answers)
    if not finish:
        replies.accepted.pop(102)  # node 102 released, but the server was killed before recording it
        trail.record_replies(round_, replies)
        return None
    trail.record_replies(round_, replies)
    probs = np.mean([reply.soft_labels for reply in replies.accepted.values()], axis=0)
    trail.aggregated(round_, "mean", sorted(replies.accepted), probs, NUM_SAMPLES)
    run.student.write_bytes(f"student weights after round {round_}".encode())
    return trail.checkpoint(round_, run.student, 0.5)


def resumed_run(root: Path, *, checkpoint_hash: str | None = None) -> AuditedRun:
    """Round 1 checkpointed, round 2 half done when the server is killed, then a new Flower run resumes."""
    identities = {node: make_identity(root / "sites", f"institution-{i}") for i, node in enumerate(NODES)}
    write_allow_list_for(root / "allow-list.toml", [identity.signer for identity in identities.values()])
    folder = root / "run"
    folder.mkdir(parents=True)
    cfg = run_config(None, root / "allow-list.toml")
    run = AuditedRun(folder, {i.signer.name: i.signer.public for i in identities.values()}, identities)
    first = AuditTrail.open(cfg, folder, RUN_ID)
    checkpoint = play_round(first, run, 1, RUN_ID)
    play_round(first, run, 2, RUN_ID, finish=False)
    # the restart
    trail = AuditTrail.open(cfg, folder, NEW_RUN_ID)
    audit = first.head(checkpoint)
    trail.resumed(1, {**audit, "hash": checkpoint_hash or audit["hash"]}, [str(RUN_ID)])
    for round_ in (2, 3):
        play_round(trail, run, round_, NEW_RUN_ID)
    trail.finished(3, run.student)
    witness_ledger_end(trail.ledger, identities, trail.witnessing)
    run.results.write_text(json.dumps({"audit": trail.summary()}), encoding="utf-8")
    return run


def verify(run: AuditedRun):
    return verify_ledger(run.ledger, coordinator_key=run.coordinator_key, allow_list=run.allow_list, client_logs=run.client_logs)


def test_a_resumed_run_verifies_with_its_abandoned_round_noted(tmp_path: Path) -> None:
    # Prepare
    run = resumed_run(tmp_path)

    # Execute
    result = verify(run)

    # Assert
    assert result.ok, [str(p) for p in result.problems]
    kinds_in_order = [e["kind"] for e in json_lines(run.ledger)]
    resumed_at = kinds_in_order.index(kinds.RUN_RESUMED)
    assert kinds_in_order[resumed_at - 2: resumed_at + 1] == ["ledger-resumed", kinds.RUN_STARTED, kinds.RUN_RESUMED]
    abandoned = [n for n in result.notes if "abandoned when the coordinator stopped" in n]
    assert len(abandoned) == 1 and "round 2" in abandoned[0] and "institution-1" in abandoned[0]


def test_the_abandoned_entries_are_those_between_the_checkpoint_and_the_resume(tmp_path: Path) -> None:
    # Prepare
    entries = json_lines(resumed_run(tmp_path).ledger)

    # Execute
    abandoned = abandoned_entries(entries)

    # Assert: round 2's first attempt (opened, one reply), nothing of round 1, nothing after the resume
    assert [(entries[s]["kind"], entries[s]["body"]["round"]) for s in sorted(abandoned)] == [
        (kinds.ROUND_OPENED, 2), (kinds.REPLY_ACCEPTED, 2)]
    resume = next(e for e in entries if e["kind"] == kinds.RUN_RESUMED)
    assert resume["body"]["abandoned_rounds"] == [2] and resume["body"]["interrupted_run_ids"] == [str(RUN_ID)]


def test_a_resume_naming_a_wrong_checkpoint_is_found(tmp_path: Path) -> None:
    # Prepare
    run = resumed_run(tmp_path, checkpoint_hash="f" * 64)

    # Execute
    result = verify(run)

    # Assert
    assert [p.check for p in result.problems] == ["resume"]
    assert "the resume names ffffffffffffffff" in str(result.problems[0])


def test_the_report_counts_the_abandoned_release_apart(tmp_path: Path) -> None:
    # Execute
    run = resumed_run(tmp_path)
    report = build_report([run.ledger], run.client_logs, coordinator_key=run.coordinator_key)

    # Assert
    assert report["verified"] is True
    logs = {log["institution"]: log for log in report["release_logs"]}
    assert (logs["institution-1"]["abandoned"], logs["institution-1"]["missing"], logs["institution-1"]["all_in_ledger"]) == (1, [], True)
    assert logs["institution-0"]["abandoned"] == 0  # its round-2 release reached the ledger before the kill
    [summary] = report["runs"]
    assert (summary["rounds_opened"], summary["rounds_aggregated"], summary["status"]) == (3, 3, "completed")
    assert summary["resumes"] == [{"run_id": str(NEW_RUN_ID), "after_round": 1, "abandoned_rounds": [2],
                                   "interrupted_run_ids": [str(RUN_ID)]}]


def test_the_privacy_section_reads_each_round_once(tmp_path: Path, run_config_mapping: dict) -> None:
    # Prepare
    run = resumed_run(tmp_path)
    cfg = run_config(run_config_mapping, tmp_path / "allow-list.toml")

    # Execute
    section = privacy_section(cfg, json_lines(run.ledger))

    # Assert: round 2's first attempt is listed apart, not mixed into the round's figures
    assert [(a["round"], a["institution_id"]) for a in section["abandoned_releases"]] == [(2, "institution-0")]
    assert section["refusals"] == []


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
