"""The coordinator's audit trail with real components: signed replies judged before aggregation, and a
ledger that verifies, the institutions' release logs included."""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.release import Identity, sign_and_log
from common.audit import kinds
from common.audit.attestation import Attestation
from common.audit.canonical import canonical, sha256_hex
from common.audit.keys import Signer, write_key_pair
from common.audit.ledger import OPENED, RESUMED
from common.audit.verify import verify_ledger
from common.config import RunConfig
from common.errors import ConfigError
from common.messages import (
    DigestInstruction,
    DigestReply,
    SoftLabelQuery,
    SoftLabelReply,
    read_attestation,
    record_digest,
)
from server.audit_trail import LEDGER, AuditTrail, check_coordinator_key, coordinator_signer
from server.rounds import send_digest

from audit_fixtures import (
    FINGERPRINT,
    NUM_SAMPLES,
    RUN_ID,
    altered,
    judge,
    make_identity,
    make_query,
    make_reply,
    run_config,
    signed_reply,
    witness_trail_end,
    write_allow_list_for,
)
from grid import MemoryGrid

NAMES = ("hospital-a", "bank-b", "clinic-c", "lab-d")


@dataclass
class Coordinator:
    """A coordinator with a fresh audit trail, and the institutions it knows (plus one it does not)."""

    trail: AuditTrail
    cfg: RunConfig
    folder: Path  # the run folder
    allow_list: dict[str, str]
    sites: dict[str, Identity]  # institution id -> identity, all on the allow-list
    rogue: Identity  # not on the allow-list

    @property
    def ledger(self) -> Path:
        return self.folder / LEDGER

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [entry for entry in self.trail.ledger.entries() if kind is None or entry["kind"] == kind]

    def verify(self, *logs: Path) -> Any:
        key = (self.folder / "coordinator.pub").read_text(encoding="ascii").strip()
        return verify_ledger(self.ledger, coordinator_key=key, allow_list=self.allow_list, client_logs=logs)


@pytest.fixture
def coordinator(tmp_path: Path, run_config_mapping: dict[str, Any]) -> Coordinator:
    sites = {name: make_identity(tmp_path / "sites", name) for name in NAMES}
    rogue = make_identity(tmp_path / "sites", "rogue")
    allow_list = write_allow_list_for(tmp_path / "allow-list.toml", [site.signer for site in sites.values()])
    cfg = run_config(run_config_mapping, tmp_path / "allow-list.toml")
    folder = tmp_path / "run"
    return Coordinator(AuditTrail.open(cfg, folder, RUN_ID), cfg, folder, allow_list, sites, rogue)


def open_round(coordinator: Coordinator, nodes: list[int], round_: int = 1) -> SoftLabelQuery:
    query = make_query(round_)
    coordinator.trail.round_opened(query, query.to_record(), nodes)
    return query


def finish(coordinator: Coordinator, round_: int = 1) -> dict[str, Any]:
    student = coordinator.folder / "student.safetensors"
    student.write_bytes(b"student weights")
    coordinator.trail.checkpoint(round_, student, 0.75)
    coordinator.trail.finished(round_, student)
    witness_trail_end(coordinator.trail, coordinator.sites)
    summary = coordinator.trail.summary()
    (coordinator.folder / "results.json").write_text(json.dumps({"audit": summary}), encoding="utf-8")
    return summary


# -------------------------------------------------------------------------------------------- opening

def test_opening_makes_a_coordinator_key_and_records_the_run(coordinator: Coordinator) -> None:
    # Execute
    opened, started = coordinator.entries()

    # Assert
    assert stat.S_IMODE((coordinator.folder / "coordinator.key").stat().st_mode) == 0o600
    assert opened["kind"] == OPENED and opened["body"]["allow_list"] == coordinator.allow_list
    assert opened["body"]["run_name"] == "run" and opened["key"] == coordinator.trail.ledger.signer.public
    assert started["kind"] == kinds.RUN_STARTED
    assert started["body"]["run_id"] == str(RUN_ID)
    assert started["body"]["config_sha256"] == sha256_hex(canonical(coordinator.cfg.to_dict()))


def test_a_configured_coordinator_key_signs_the_ledger(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    key = Signer.generate(kinds.COORDINATOR)
    private, _ = write_key_pair(key, tmp_path / "keys")
    site = make_identity(tmp_path / "sites", "hospital-a")
    write_allow_list_for(tmp_path / "allow-list.toml", [site.signer])
    cfg = run_config(run_config_mapping, tmp_path / "allow-list.toml", coordinator_key=str(private))

    # Execute
    trail = AuditTrail.open(cfg, tmp_path / "run", RUN_ID)

    # Assert
    assert trail.ledger.signer.public == key.public
    assert not (tmp_path / "run" / "coordinator.key").exists()


def test_reopening_a_run_folder_resumes_the_same_ledger(coordinator: Coordinator) -> None:
    # Prepare
    first_id = coordinator.entries()[0]["ledger"]

    # Execute
    again = AuditTrail.open(coordinator.cfg, coordinator.folder, RUN_ID)
    coordinator.trail = again
    finish(coordinator)

    # Assert
    kinds_seen = [entry["kind"] for entry in coordinator.entries()]
    assert kinds_seen[:4] == [OPENED, kinds.RUN_STARTED, RESUMED, kinds.RUN_STARTED]
    assert {entry["ledger"] for entry in coordinator.entries()} == {first_id}
    assert coordinator.verify().ok


# ------------------------------------------------------------------------------------ judging replies

def test_a_valid_signed_reply_is_accepted(coordinator: Coordinator) -> None:
    # Prepare
    query = open_round(coordinator, [11])
    content = signed_reply(coordinator.sites["hospital-a"], query, 11)

    # Execute
    replies = judge(coordinator.trail, query, [(11, None, content)])

    # Assert
    assert list(replies.accepted) == [11] and replies.rejected == {}
    assert replies.attestations[11] == read_attestation(content)
    assert replies.payload_digests[11] == record_digest(content)
    assert coordinator.trail.bindings == {11: "hospital-a"}


def unsigned(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    return make_reply(query)


def tampered(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    return altered(signed_reply(c.sites["hospital-a"], query, 11))


def by_rogue(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    return signed_reply(c.rogue, query, 11)


def by_impostor(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    impostor = Identity(Signer.generate("hospital-a"), c.rogue.release_log)
    return signed_reply(impostor, query, 11)


def other_round(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    return signed_reply(c.sites["hospital-a"], query, 11, round_=query.round + 1)


def other_node(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    return signed_reply(c.sites["hospital-a"], query, 11, node_id=12)


def other_run(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    return signed_reply(c.sites["hospital-a"], query, 11, run_id=RUN_ID - 1)


def other_query(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    earlier = SoftLabelQuery(**{**query.__dict__, "temperature": 4.0})
    return sign_and_log(c.sites["hospital-a"], make_reply(query), earlier.to_record(), run_id=RUN_ID,
                        round_=query.round, node_id=11, fingerprint=FINGERPRINT, with_counts=False,
                        with_accuracy=False)


def borrowed_signature(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    content = signed_reply(c.sites["hospital-a"], query, 11)
    other = read_attestation(signed_reply(c.sites["hospital-a"], query, 12))
    content["attestation"] = ConfigRecord({"statement": read_attestation(content).statement, "signature": other.signature})
    return content


def malformed(c: Coordinator, query: SoftLabelQuery) -> RecordDict:
    content = make_reply(query)
    content["attestation"] = ConfigRecord({"statement": 5, "signature": "x"})
    return content


@pytest.mark.parametrize(("make", "check", "expected"), [
    (tampered, "digest", "attestation says payload_sha256 = "),
    (unsigned, "unsigned", "the reply is unsigned"),
    (by_rogue, "allow-list", "institution 'rogue' is not on the allow-list"),
    (by_impostor, "allow-list", "but the allow-list key of 'hospital-a' is"),
    (other_round, "statement", "attestation says round = 2, observed 1"),
    (other_node, "statement", "attestation says node_id = '12', observed '11'"),
    (other_run, "statement", f"attestation says run_id = '{RUN_ID - 1}', observed '{RUN_ID}'"),
    (other_query, "statement", "attestation says query_sha256 = "),
    (borrowed_signature, "signature", "bad signature"),
    (malformed, "statement", "malformed attestation"),
], ids=lambda value: value.__name__ if callable(value) else None)
def test_a_bad_attestation_is_rejected_with_the_failed_check(coordinator: Coordinator, make: Any, check: str, expected: str) -> None:
    # Prepare
    query = open_round(coordinator, [11])
    content = make(coordinator, query)

    # Execute
    replies = judge(coordinator.trail, query, [(11, None, content)])

    # Assert
    assert replies.accepted == {} and replies.checks == {11: check}
    assert replies.rejected[11].startswith("AuditError: ") and expected in replies.rejected[11]
    assert coordinator.trail.bindings == {}


def test_an_altered_reply_is_stopped_by_the_digest_not_by_validation(coordinator: Coordinator) -> None:
    # Prepare
    query = open_round(coordinator, [11])
    content = tampered(coordinator, query)

    # Execute
    as_received = SoftLabelReply.from_record(content, query)  # the tampered labels are a valid reply
    replies = judge(coordinator.trail, query, [(11, None, content)])

    # Assert
    assert not np.array_equal(as_received.soft_labels, SoftLabelReply.from_record(make_reply(query), query).soft_labels)
    assert replies.checks == {11: "digest"} and replies.accepted == {}


def test_a_second_node_claiming_an_institution_is_rejected(coordinator: Coordinator) -> None:
    # Prepare
    query = open_round(coordinator, [11, 12])
    site = coordinator.sites["hospital-a"]
    copied_key = Identity(site.signer, coordinator.folder.parent / "elsewhere" / "release-log.jsonl")
    answers = [(11, None, signed_reply(site, query, 11)), (12, None, signed_reply(copied_key, query, 12))]

    # Execute
    replies = judge(coordinator.trail, query, answers)

    # Assert
    assert list(replies.accepted) == [11] and replies.checks == {12: "identity"}
    assert "node 12 signs as 'hospital-a', but node 11 is 'hospital-a'" in replies.rejected[12]


def test_a_node_switching_institution_is_rejected(coordinator: Coordinator) -> None:
    # Prepare
    first = open_round(coordinator, [11], round_=1)
    judge(coordinator.trail, first, [(11, None, signed_reply(coordinator.sites["hospital-a"], first, 11))])
    second = open_round(coordinator, [11], round_=2)

    # Execute
    replies = judge(coordinator.trail, second, [(11, None, signed_reply(coordinator.sites["bank-b"], second, 11))])

    # Assert
    assert replies.checks == {11: "identity"}
    assert "node 11 signs as 'bank-b', but it signed as 'hospital-a' before" in replies.rejected[11]


def test_without_an_allow_list_unsigned_replies_are_accepted_and_recorded(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = RunConfig.from_run_config({**run_config_mapping, "allow-list": "", "coordinator-key": ""})
    trail = AuditTrail.open(cfg, tmp_path / "run", RUN_ID)
    query = make_query(1)
    trail.round_opened(query, query.to_record(), [11])

    # Execute
    replies = judge(trail, query, [(11, None, make_reply(query))])
    trail.record_replies(1, replies)
    student = tmp_path / "run" / "student.safetensors"
    student.write_bytes(b"weights")
    summary = trail.finished(1, student)

    # Assert
    assert list(replies.accepted) == [11] and replies.attestations == {11: None}
    assert trail.ledger.entries()[0]["body"]["allow_list"] is None
    assert summary["signatures_checked"] is False
    assert verify_ledger(tmp_path / "run" / LEDGER).ok


# ------------------------------------------------------------------------------------ a recorded round

@pytest.fixture
def judged_round(coordinator: Coordinator) -> tuple[Coordinator, SoftLabelQuery, Any, dict[int, RecordDict]]:
    """One round with every kind of answer, recorded and closed as the server does it."""
    nodes = [11, 12, 13, 14, 15, 16, 17]
    query = open_round(coordinator, nodes)
    sites = coordinator.sites
    copied_key = Identity(sites["hospital-a"].signer, coordinator.folder.parent / "elsewhere" / "release-log.jsonl")
    sent = {
        11: signed_reply(sites["hospital-a"], query, 11),
        12: signed_reply(sites["bank-b"], query, 12),
        13: altered(signed_reply(sites["clinic-c"], query, 13)),  # changed in transit
        14: make_reply(query),  # unsigned
        15: signed_reply(coordinator.rogue, query, 15),  # not on the allow-list
        16: signed_reply(copied_key, query, 16),  # a second node signing as hospital-a
    }
    signed_reply(sites["lab-d"], query, 17)  # logged by lab-d, but it never reaches the coordinator in time
    replies = judge(coordinator.trail, query, [(node, None, content) for node, content in sent.items()], nodes)
    coordinator.trail.record_replies(1, replies)
    probs = np.mean([reply.soft_labels for reply in replies.accepted.values()], axis=0)
    coordinator.trail.aggregated(1, "mean", sorted(replies.accepted), probs, NUM_SAMPLES)
    finish(coordinator)
    return coordinator, query, replies, sent


def test_record_replies_writes_each_verdict_with_its_reason(judged_round: tuple) -> None:
    # Prepare
    coordinator, _, replies, sent = judged_round

    # Execute
    accepted = coordinator.entries(kinds.REPLY_ACCEPTED)
    rejected = {entry["body"]["node_id"]: entry["body"] for entry in coordinator.entries(kinds.REPLY_REJECTED)}

    # Assert
    assert [(e["body"]["node_id"], e["body"]["institution_id"]) for e in accepted] == [("11", "hospital-a"), ("12", "bank-b")]
    assert {e["body"]["phase"] for e in [*accepted, *coordinator.entries(kinds.REPLY_REJECTED)]} == {"soft-labels"}
    for entry in accepted:
        node = int(entry["body"]["node_id"])
        assert entry["body"]["attestation"] == read_attestation(sent[node]).as_dict()
        assert (entry["body"]["payload_sha256"], entry["body"]["payload_bytes"]) == record_digest(sent[node])
        assert entry["body"]["uplink_bytes"] == replies.uplink_bytes[node] > 0
    assert {node: body["check"] for node, body in rejected.items()} == {
        "13": "digest", "14": "unsigned", "15": "allow-list", "16": "identity", "17": "timeout"}
    assert all(body["reason"] == replies.rejected[int(node)] for node, body in rejected.items())
    assert "no reply within round-timeout" in rejected["17"]["reason"]


def test_the_aggregation_and_summary_name_the_accepted_institutions(judged_round: tuple) -> None:
    # Prepare
    coordinator, *_ = judged_round

    # Execute
    [aggregated] = coordinator.entries(kinds.AGGREGATED)
    summary = json.loads((coordinator.folder / "results.json").read_text(encoding="utf-8"))["audit"]

    # Assert
    assert aggregated["body"]["nodes"] == ["11", "12"]
    assert aggregated["body"]["institutions"] == ["hospital-a", "bank-b"]
    assert summary["institutions"] == {"11": "hospital-a", "12": "bank-b"}
    assert summary["rejections"] == 5 and summary["signatures_checked"] is True
    assert summary["ledger_entries"] == len(coordinator.entries())
    assert summary["ledger_head"] == coordinator.entries()[-1]["hash"]


def test_the_recorded_round_verifies_with_the_institutions_logs(judged_round: tuple) -> None:
    # Prepare
    coordinator, *_ = judged_round
    sites = coordinator.sites
    logs = [sites["hospital-a"].release_log, sites["bank-b"].release_log, sites["lab-d"].release_log]

    # Execute
    result = coordinator.verify(*logs)

    # Assert
    assert result.ok, "\n".join(map(str, result.problems))
    [note] = [note for note in result.notes if "after its round-timeout" in note]
    assert note.endswith("release-log.jsonl: the release of round 1 reached the coordinator after its round-timeout "
                         "(ledger records the timeout)")


def test_rejected_replies_keep_the_attestation_they_claimed(judged_round: tuple) -> None:
    # Prepare
    coordinator, _, _, sent = judged_round

    # Execute
    rejected = {entry["body"]["node_id"]: entry["body"] for entry in coordinator.entries(kinds.REPLY_REJECTED)}

    # Assert
    for node, institution in (("13", "clinic-c"), ("15", "rogue"), ("16", "hospital-a")):
        assert rejected[node]["attestation"] == read_attestation(sent[int(node)]).as_dict()
        assert rejected[node]["institution_id"] == institution
    assert rejected["14"]["attestation"] is None and rejected["14"]["institution_id"] is None
    assert rejected["17"]["attestation"] is None


def test_a_release_changed_in_transit_still_cross_checks_against_its_rejection(judged_round: tuple) -> None:
    # Prepare
    coordinator, *_ = judged_round

    # Execute
    result = coordinator.verify(*[site.release_log for site in coordinator.sites.values()])

    # Assert
    assert result.ok, "\n".join(map(str, result.problems))


def test_a_failed_run_closes_the_ledger(coordinator: Coordinator) -> None:
    # Prepare
    query = open_round(coordinator, [11])
    replies = judge(coordinator.trail, query, [(11, None, signed_reply(coordinator.sites["hospital-a"], query, 11))])
    coordinator.trail.record_replies(1, replies)

    # Execute
    summary = coordinator.trail.failed(RuntimeError("out of memory"))

    # Assert
    last = coordinator.entries()[-1]
    assert last["kind"] == kinds.RUN_FAILED
    assert last["body"] == {"status": "failed", "error": "RuntimeError: out of memory"}
    assert summary["ledger_head"] == last["hash"]
    witness_trail_end(coordinator.trail, coordinator.sites)  # a failed run's record is witnessed too
    assert coordinator.verify(coordinator.sites["hospital-a"].release_log).ok


def test_the_attestation_binds_the_exact_reply_bytes(coordinator: Coordinator) -> None:
    # Prepare
    query = open_round(coordinator, [11])
    content = signed_reply(coordinator.sites["hospital-a"], query, 11)

    # Execute
    attestation = read_attestation(content)
    fields = attestation.fields

    # Assert
    assert isinstance(attestation, Attestation)
    assert (fields["payload_sha256"], fields["payload_bytes"]) == record_digest(content)
    assert fields["query_sha256"] == record_digest(query.to_record())[0] == coordinator.trail.query_sha256
    assert (fields["run_id"], fields["round"], fields["node_id"]) == (str(RUN_ID), 1, "11")
    log = [json.loads(line) for line in coordinator.sites["hospital-a"].release_log.read_text().splitlines()]
    assert log[-1]["kind"] == kinds.RELEASE and log[-1]["body"]["attestation"] == attestation.as_dict()


def test_fedmd_digest_replies_are_checked_and_recorded_in_the_digest_phase(
    coordinator: Coordinator, memory_grid: type[MemoryGrid],
) -> None:
    # Prepare
    sites = coordinator.sites
    query = open_round(coordinator, [11, 12])
    replies = judge(coordinator.trail, query, [(11, None, signed_reply(sites["hospital-a"], query, 11)),
                                               (12, None, signed_reply(sites["bank-b"], query, 12))])
    coordinator.trail.record_replies(1, replies)
    probs = np.mean([reply.soft_labels for reply in replies.accepted.values()], axis=0)
    coordinator.trail.aggregated(1, "mean", [11, 12], probs, NUM_SAMPLES)
    instruction = DigestInstruction(round=1, fingerprint=FINGERPRINT, temperature=2.0, sample_ids=query.sample_ids,
                                    consensus=probs, digest_epochs=1, revisit_epochs=1)
    coordinator.trail.digest_opened(instruction, instruction.to_record(), [11, 12])

    def digest_reply(site: Identity, node: int) -> RecordDict:
        return sign_and_log(site, DigestReply(1, 0.31, 0.27).to_record(), instruction.to_record(), run_id=RUN_ID,
                            round_=1, node_id=node, fingerprint=FINGERPRINT, digest=True)

    changed = digest_reply(sites["bank-b"], 12)
    changed["metrics"] = MetricRecord({"round": 1, "digest-loss": 0.01, "revisit-loss": 0.27})  # altered in transit
    answers = {11: digest_reply(sites["hospital-a"], 11), 12: changed}
    grid = memory_grid(lambda message: answers[message.metadata.dst_node_id])

    # Execute
    outcome = send_digest(grid, [11, 12], instruction, 30.0, partial(coordinator.trail.check_digest_reply, instruction))
    coordinator.trail.record_replies(1, outcome, phase="digest")
    finish(coordinator)

    # Assert
    assert [m.content for m in grid.sent] == [instruction.to_record()] * 2
    assert [(m.metadata.message_type, m.metadata.group_id) for m in grid.sent] == [("train.digest", "1-digest")] * 2
    assert list(outcome.accepted) == [11] and outcome.checks == {12: "digest"}
    digest_entries = [e["body"] for e in coordinator.entries() if e["body"].get("phase") == "digest"]
    assert [(body["node_id"], body.get("check")) for body in digest_entries] == [("11", None), ("12", "digest")]
    assert json.loads(digest_entries[0]["attestation"]["statement"])["payload"]["kind"] == "digest-losses"
    result = coordinator.verify(sites["hospital-a"].release_log, sites["bank-b"].release_log)
    assert result.ok, "\n".join(map(str, result.problems))


def test_an_audited_deployed_run_needs_an_encrypted_coordinator_key_outside_the_run_folder(
        tmp_path: Path, run_config_mapping: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    run_dir = tmp_path / "runs" / "q4"
    plain_key, _ = write_key_pair(Signer.generate(kinds.COORDINATOR), tmp_path / "plain")
    inside, _ = write_key_pair(Signer.generate(kinds.COORDINATOR), run_dir)
    encrypted, _ = write_key_pair(Signer.generate(kinds.COORDINATOR), tmp_path / "keys", b"a passphrase")

    def cfg(**changes: Any) -> RunConfig:
        return RunConfig.from_run_config({**run_config_mapping, "allow-list": str(tmp_path / "allow-list.toml"),
                                          "coordinator-key": "", "sites-dir": "", **changes})

    # Execute / Assert
    with pytest.raises(ConfigError, match="a deployed run needs coordinator-key"):
        check_coordinator_key(cfg(), run_dir)
    with pytest.raises(ConfigError, match="lies inside the run folder"):
        check_coordinator_key(cfg(**{"coordinator-key": str(inside)}), run_dir)
    with pytest.raises(ConfigError, match="is not passphrase-protected"):
        check_coordinator_key(cfg(**{"coordinator-key": str(plain_key)}), run_dir)
    check_coordinator_key(cfg(**{"coordinator-key": str(encrypted)}), run_dir)
    check_coordinator_key(cfg(**{"allow-list": ""}), run_dir)  # unaudited: the run may make its own key
    check_coordinator_key(cfg(**{"sites-dir": str(tmp_path / "sites")}), run_dir)  # a simulation, one machine
    monkeypatch.setenv("FEDSTILL_KEY_PASSPHRASE", "a passphrase")
    assert coordinator_signer(cfg(**{"coordinator-key": str(encrypted)}), run_dir).name == kinds.COORDINATOR
