"""Institutions by name in what a run records: results.json's round rows and refusals, report.md's tables
(server/results/figures.py, privacy.py, report.py), from what the ledger knows (common/audit/naming.py) and what a
refusing node says of itself (client/scrub.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict

from client.scrub import local_detail_kept
from common.audit import kinds
from common.audit.naming import ATTESTATION, CLAIM, node_names, refusal_naming, refusing_institution
from common.config import RunConfig, default_run_config
from common.errors import ConfigError, PolicyViolation, PrivacyBudgetExceeded
from server.audit_trail import AuditTrail
from server.results.figures import institution_names, round_row
from server.results.privacy import privacy_section
from server.results.report import render
from server.results.schema import GUARANTEE_NONE, RoundRow
from server.rounds import query_soft_labels

from audit_fixtures import NUM_SAMPLES, RUN_ID, judge, make_identity, make_query, run_config, signed_reply, write_allow_list_for
from grid import MemoryGrid, server_task

REFUSAL = "node error: PrivacyBudgetExceeded: round 1: DP-SGD training refused: this institution has spent epsilon 4"


def entry(kind: str, **body: Any) -> dict[str, Any]:
    return {"kind": kind, "seq": 0, "body": body}


# ---------------------------------------------------------------------------------------------------
# common/audit/naming.py
# ---------------------------------------------------------------------------------------------------


def test_a_refusal_names_its_institution_and_the_name_reads_back() -> None:
    # Execute
    text = refusal_naming("site-policy: max-samples = 100 refuses 400 samples", "hospital-a")

    # Assert
    assert text.startswith("site-policy: max-samples = 100")  # a PolicyViolation still starts with its policy line
    assert refusing_institution(f"node error: PolicyViolation: {text}") == "hospital-a"
    assert refusing_institution("node error: PolicyViolation: site-policy: refuses") is None
    assert refusing_institution('[refused by institution "<script>"]') is None  # not an institution id
    assert refusing_institution(None) is None


def test_node_names_prefer_a_checked_attestation_to_a_claim() -> None:
    # Prepare: node 1 refused first (naming itself), then its signed reply was accepted; node 2 only ever refused;
    # node 3 claimed a name in a rejected attestation; node 4 is named by an aggregation; node 5 never by anything
    entries = [
        entry(kinds.REPLY_REJECTED, node_id="1", institution_id=None, check="privacy-budget",
              reason=f'{REFUSAL} [refused by institution "liar"]'),
        entry(kinds.REPLY_ACCEPTED, node_id="1", institution_id="hospital-a"),
        entry(kinds.REPLY_REJECTED, node_id="2", institution_id=None, check="site-policy",
              reason=f'{REFUSAL} [refused by institution "bank-b"]'),
        entry(kinds.REPLY_REJECTED, node_id="3", institution_id="clinic-c", check="allow-list", reason="unknown key"),
        entry(kinds.AGGREGATED, nodes=["4"], institutions=["lab-d"]),
        entry(kinds.REPLY_REJECTED, node_id="5", institution_id=None, check="timeout", reason="no reply"),
    ]

    # Execute
    names = node_names(entries)

    # Assert
    assert names == {"1": ("hospital-a", ATTESTATION), "2": ("bank-b", CLAIM), "3": ("clinic-c", CLAIM),
                     "4": ("lab-d", ATTESTATION)}


# ---------------------------------------------------------------------------------------------------
# client/scrub.py: the node names itself in a refusal
# ---------------------------------------------------------------------------------------------------


def _raising(error: Exception):
    @local_detail_kept
    def handler(message: Message, context: Context) -> Message:
        raise error
    return handler


@pytest.mark.usefixtures("server_task")
@pytest.mark.parametrize("error", [PrivacyBudgetExceeded("round 1: refused"), PolicyViolation("site-policy: x refuses y")])
def test_a_refusal_leaves_the_node_naming_its_institution(error: Exception) -> None:
    # Prepare
    context = Context(1, 1, {"institution-id": "hospital-a", "signing-key": "keys/hospital-a.key"}, RecordDict(),
                      default_run_config())
    message = Message(RecordDict(), dst_node_id=1, message_type="query", group_id="1")

    # Execute
    with pytest.raises(type(error)) as raised:
        _raising(error)(message, context)

    # Assert
    assert str(raised.value) == f'{error} [refused by institution "hospital-a"]'


@pytest.mark.usefixtures("server_task")
def test_a_failure_is_not_a_refusal_and_a_node_without_identity_names_nobody() -> None:
    # Prepare
    message = Message(RecordDict(), dst_node_id=1, message_type="query", group_id="1")
    named = Context(1, 1, {"institution-id": "hospital-a", "signing-key": "k.key"}, RecordDict(), default_run_config())
    anonymous = Context(1, 1, {}, RecordDict(), default_run_config())

    # Execute / Assert
    failure = ConfigError("teacher-models: unknown model")
    with pytest.raises(ConfigError) as raised:
        _raising(failure)(message, named)
    assert raised.value is failure
    refusal = PrivacyBudgetExceeded("round 1: refused")
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        _raising(refusal)(message, anonymous)
    assert refused.value is refusal


@pytest.mark.parametrize("length", [40, 900])
def test_the_name_a_refusal_claims_survives_the_servers_one_line_reason(length: int) -> None:
    # Prepare: the error as a Flower error reply carries it, short or longer than the ledger's line
    message = refusal_naming("round 1: refused " + "x" * length, "hospital-a")
    raw = f"<class 'common.errors.PrivacyBudgetExceeded'>:<'{message}'>"

    # Execute
    with server_task():
        replies = query_soft_labels(MemoryGrid(lambda message: Error(code=0, reason=raw)), [12], make_query(1), 30.0)
    reason = replies.rejected[12]

    # Assert
    assert reason.startswith("node error: PrivacyBudgetExceeded: ") and len(reason) < 700
    assert refusing_institution(reason) == "hospital-a"


# ---------------------------------------------------------------------------------------------------
# server/results: round rows, refusals, report.md
# ---------------------------------------------------------------------------------------------------


def test_a_round_row_names_each_node_checked_or_claimed(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare: hospital-a answers (signed, checked); a rogue key claims clinic-c; bank-b refuses on its budget
    sites = {name: make_identity(tmp_path / "sites", name) for name in ("hospital-a", "bank-b")}
    rogue = make_identity(tmp_path / "rogue", "clinic-c")
    write_allow_list_for(tmp_path / "allow-list.toml", [site.signer for site in sites.values()])
    trail = AuditTrail.open(run_config(run_config_mapping, tmp_path / "allow-list.toml"), tmp_path / "run", RUN_ID)
    query = make_query(1)
    trail.round_opened(query, query.to_record(), [11, 12, 13, 14])
    replies = judge(trail, query, [(11, None, signed_reply(sites["hospital-a"], query, 11)),
                                   (12, 'PrivacyBudgetExceeded: refused [refused by institution "bank-b"]', None),
                                   (13, None, signed_reply(rogue, query, 13))], [11, 12, 13, 14])
    trail.record_replies(1, replies)

    # Execute
    row = round_row(query, replies, {"accuracy": 0.5}, 0.5, 0.1, NUM_SAMPLES, None, 1.0, trail.institutions())

    # Assert
    assert row.institutions == {"11": "hospital-a"}
    assert row.institutions_claimed == {"12": "bank-b", "13": "clinic-c"}  # node 14 was silent: nobody
    assert institution_names(replies, {}) == ({}, {"11": "hospital-a", "12": "bank-b", "13": "clinic-c"})
    assert RoundRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    # the privacy section names the refusal by the node's claim, and says so
    cfg = RunConfig.from_run_config(run_config_mapping)
    [refusal] = privacy_section(cfg, trail.ledger.entries())["refusals"]
    assert (refusal["node_id"], refusal["institution_id"], refusal["institution_from"]) == ("12", "bank-b", CLAIM)


def test_a_refusal_after_a_checked_reply_is_named_by_the_attestation(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare: bank-b answers round 1 (signed), then refuses round 2 (an older node: no name in its words)
    site = make_identity(tmp_path / "sites", "bank-b")
    write_allow_list_for(tmp_path / "allow-list.toml", [site.signer])
    trail = AuditTrail.open(run_config(run_config_mapping, tmp_path / "allow-list.toml"), tmp_path / "run", RUN_ID)
    for round_, answer in ((1, (12, None, None)), (2, (12, "PrivacyBudgetExceeded: refused", None))):
        query = make_query(round_)
        trail.round_opened(query, query.to_record(), [12])
        answers = [(12, None, signed_reply(site, query, 12))] if answer[1] is None else [answer]
        trail.record_replies(round_, judge(trail, query, answers))

    # Execute
    section = privacy_section(RunConfig.from_run_config(run_config_mapping), trail.ledger.entries())

    # Assert
    [refusal] = section["refusals"]
    assert (refusal["round"], refusal["institution_id"], refusal["institution_from"]) == (2, "bank-b", ATTESTATION)
    assert section["guarantee"] == GUARANTEE_NONE and section["epsilon_final"] == {} and section["epsilon_max"] is None


def test_report_md_labels_nodes_by_institution_and_says_no_formal_guarantee(tmp_path: Path) -> None:
    # Prepare
    rows = [RoundRow(round=r, temperature=3.0, student_accuracy=0.5, ensemble_accuracy=0.6, clients_replied=1,
                     clients_rejected={"12": REFUSAL}, uplink_bytes=400, uplink_bytes_per_client={"11": 400},
                     downlink_bytes=100, teacher_accuracy={"11": 0.8}, wall_s=1.0, institutions={"11": "hospital-a"},
                     institutions_claimed={"12": "bank-b"}).to_json() for r in (1, 2)]
    privacy = {"mechanism": "none", "guarantee": "none", "secure_aggregation": False, "run_parameters": {}, "delta": [],
               "institution_parameters": {}, "epsilon_per_round": [], "epsilon_final": {}, "epsilon_max": None,
               "refusals": [{"round": 1, "check": "privacy-budget", "node_id": "12", "institution_id": "bank-b",
                             "institution_from": CLAIM, "reason": REFUSAL}]}

    # Execute
    page = render({"status": "completed", "scenario": {"num-server-rounds": 2}, "rounds": rows, "privacy": privacy}, tmp_path)

    # Assert
    assert "| 1 | 3 | 0.5000 | 0.6000 | 1 | 1 (bank-b (claimed)) | 400 | 1.0 |" in page
    assert "| hospital-a | 11 | 2 | 800 | 0 | 0.8000 |" in page and "| bank-b (claimed) | 12 | 0 | 0 | 2 | – |" in page
    assert "**No formal privacy guarantee**" in page and "Mechanism none" not in page
    assert f"| 1 | bank-b (claimed) | privacy-budget | {REFUSAL} |" in page


def test_rows_written_before_keep_reading(tmp_path: Path) -> None:
    # Prepare: a row of an older results.json, without the institutions
    row = RoundRow(round=1, student_accuracy=0.5, ensemble_accuracy=None, clients_replied=1, clients_rejected={},
                   uplink_bytes=1, uplink_bytes_per_client={"1": 1}, downlink_bytes=1, wall_s=1.0).to_json()
    del row["institutions"], row["institutions_claimed"]

    # Execute
    back = RoundRow.from_json(row)

    # Assert
    assert (back.institutions, back.institutions_claimed) == (None, None)
    assert "## Institutions" not in render({"rounds": [row], "scenario": {}}, tmp_path)
