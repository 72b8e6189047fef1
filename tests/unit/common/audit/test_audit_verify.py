"""Verification of a recorded run: every tampering with the ledger or a release log is found and named.

The run is recorded once per module by the real audit trail (see audit_fixtures); each test tampers with
its own copy. Ledger lines of that run:

     1 ledger-opened        5 reply-accepted r1 (102)   9 reply-accepted r2 (101)   13 run-finished
     2 run-started          6 aggregated r1            10 reply-accepted r2 (102)
     3 round-opened r1      7 student-checkpoint r1    11 aggregated r2
     4 reply-accepted r1 (101)  8 round-opened r2      12 student-checkpoint r2

then the closing witness exchange: 14 exchange-opened (witness), 15 tree-head (size 14), 16-17 cosigned
(101, 102), 18-19 reply-accepted (witness).

Each institution's release log: 1 ledger-opened, 2 release r1, 3 release r2, then 4 cosigned (size 14),
5-6 receipt r1, r2, 7 release (witness).

Tampering with an entry also changes its Merkle leaf: the tree head no longer matches, and the institutions'
cosigned heads show another history (checks in WITNESS_CHECKS). Those findings come with every rewrite; the tests
name the one that points at the tampered entry.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.audit import kinds
from common.audit.attestation import attest
from common.audit.canonical import canonical
from common.audit.keys import Signer
from common.audit.ledger import ENTRY_FIELDS, Ledger, entry_hash
from common.audit.verify import Finding, Verification, read_chain, verify_ledger

from audit_fixtures import FINGERPRINT, RUN_ID, AuditedRun, audited_run, make_identity, make_query, signed_reply

LEDGER_LINES, LOG_LINES = 19, 7
ACCEPTED_R1, CHECKPOINT_R1, ACCEPTED_R2, CLOSING, TREE_HEAD = 4, 7, 9, 13, 15
WITNESS_CHECKS = {"tree head", "cosignature", "witness", "fork", "truncation", "receipt"}
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# ---------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> AuditedRun:
    """One audited run of two rounds and two institutions; tests copy it before touching it."""
    return audited_run(tmp_path_factory.mktemp("recorded"))


@pytest.fixture
def run(recorded: AuditedRun, tmp_path: Path) -> AuditedRun:
    return recorded.copy_to(tmp_path / "copy")


def verify(run: AuditedRun, *, pinned: bool = True, logs: bool = True, **overrides: Any) -> Verification:
    """What an auditor runs: the coordinator key pinned, the allow-list and every institution's log."""
    options: dict[str, Any] = {
        "coordinator_key": run.coordinator_key if pinned else None, "allow_list": run.allow_list,
        "client_logs": run.client_logs if logs else (),
    }
    return verify_ledger(run.ledger, **(options | overrides))


def found(result: Verification, check: str, line: int | None, log: str = "ledger.jsonl") -> Finding:
    """The finding of `check` at `line` of `log`; its text names the line and the check."""
    matches = [f for f in result.problems if f.check == check and f.line == line and f.log.endswith(log)]
    assert matches, f"no {check!r} finding at {log} line {line}; found:\n" + "\n".join(map(str, result.problems))
    text = str(matches[0])
    assert f": {check}: " in text and (line is None or f"{log} line {line}" in text)
    return matches[0]


def entries_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def write_lines(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical(entry) + b"\n" for entry in entries))


def forge(entries: list[dict[str, Any]], signer: Signer, start: int = 0) -> list[dict[str, Any]]:
    """Re-link and re-sign entries[start:] with `signer`, as someone holding that key could rewrite a log."""
    forged = [dict(entry) for entry in entries]
    for index in range(start, len(forged)):
        entry = forged[index]
        if index > 0:
            entry["prev"] = forged[index - 1]["hash"]
        entry["hash"] = entry_hash(entry)
        entry.update(signer=signer.name, key=signer.public, sig=signer.sign(entry["hash"].encode("ascii")))
    return forged


def value_span(line: bytes, field: str) -> tuple[int, int]:
    """Byte offsets [start, end) of a top-level string field's value within a canonical line."""
    marker = b'"' + field.encode() + b'":"'
    start = line.rindex(marker) + len(marker)  # top-level fields follow `body`, so their marker comes last
    return start, line.index(b'"', start)


def small_ledger(path: Path) -> Path:
    """A few small entries written by the real Ledger: opened, started, one round, finished."""
    coordinator = Signer.generate(kinds.COORDINATOR)
    ledger = Ledger.open(path, coordinator, {"run_name": "small", "allow_list": None})
    ledger.append(kinds.RUN_STARTED, {"run_id": "7"})
    ledger.append(kinds.ROUND_OPENED, {"round": 1})
    ledger.append(kinds.RUN_FINISHED, {"status": "completed", "rounds": 1})
    return path


# ------------------------------------------------------------------------------------ the untouched run

def test_the_untouched_run_verifies(run: AuditedRun) -> None:
    # Execute
    result = verify(run)

    # Assert
    assert result.ok, "\n".join(map(str, result.problems))
    assert result.notes == ["final tree head (size 14, root " + json.loads(run.lines()[TREE_HEAD - 1])["body"]["root"][:16]
                            + "...) cosigned by ['institution-0', 'institution-1']"]
    assert result.checked == {"ledger.jsonl": LEDGER_LINES, **{str(log): LOG_LINES for log in run.client_logs}}


def test_without_a_pinned_key_the_run_verifies_with_a_note_saying_so(run: AuditedRun) -> None:
    # Execute
    result = verify(run, pinned=False)

    # Assert
    assert result.ok
    assert any("coordinator key not pinned" in note and "--coordinator-key" in note for note in result.notes)


# ------------------------------------------------------------------------------------ single-byte changes

@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch") / "ledger.jsonl"


@settings(max_examples=100, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_of_the_ledger_is_found_at_its_line(
    recorded: AuditedRun, scratch: Path, position: int, value: int,
) -> None:
    # Prepare
    data = recorded.ledger.read_bytes()
    position %= len(data)
    assume(value != data[position])
    changed = bytearray(data)
    changed[position] = value
    scratch.write_bytes(bytes(changed))
    line = data[:position].count(b"\n") + 1

    # Execute
    result = verify_ledger(scratch, coordinator_key=recorded.coordinator_key, allow_list=recorded.allow_list)

    # Assert
    assert not result.ok
    assert any(f.line == line for f in result.problems), f"line {line}: " + "\n".join(map(str, result.problems))


def test_a_change_in_any_field_of_any_entry_is_found(tmp_path: Path) -> None:
    # Prepare
    path = small_ledger(tmp_path / "ledger.jsonl")
    data = path.read_bytes()
    key = entries_of(path)[0]["key"]
    positions = []  # (line number, byte offset in the file): each field's name and first, middle and last value bytes
    offset = 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        for field in ENTRY_FIELDS:
            name = line.rindex(b'"' + field.encode() + b'":') + 1
            value = name + len(field) + 2
            end = line.index(b",\"", value) if field != "time" else len(line) - 2
            picks = {name, value, value + 1, (value + end) // 2, end - 1} if field != "signer" else {name}
            positions += [(number, offset + pick) for pick in sorted(picks)]
        positions += [(number, offset), (number, offset + len(line) - 1)]  # the braces and the newline
        offset += len(line)
    missed = []

    # Execute
    for number, position in positions:
        changed = bytearray(data)
        changed[position] ^= 0x01
        path.write_bytes(bytes(changed))
        result = verify_ledger(path, coordinator_key=key)
        if result.ok or not any(f.line == number for f in result.problems):
            missed.append((number, data[max(0, position - 12):position + 4]))

    # Assert
    assert len(positions) > 4 * len(ENTRY_FIELDS) * 3
    assert missed == []


def test_a_changed_signer_name_is_found(run: AuditedRun) -> None:
    # Prepare
    lines = run.lines()
    lines[CHECKPOINT_R1 - 1] = lines[CHECKPOINT_R1 - 1].replace(b'"signer":"coordinator"', b'"signer":"coordinatos"')
    run.ledger.write_bytes(b"".join(lines))

    # Execute
    result = verify(run)

    # Assert
    assert any(f.line == CHECKPOINT_R1 for f in result.problems), result.problems


def test_a_signature_re_encoded_with_other_padding_bits_is_found(run: AuditedRun) -> None:
    # Prepare
    lines = run.lines()
    signature = json.loads(lines[CHECKPOINT_R1 - 1])["sig"]
    other = signature[:-3] + B64[B64.index(signature[-3]) ^ 1] + "=="
    assert base64.b64decode(other) == base64.b64decode(signature)
    lines[CHECKPOINT_R1 - 1] = lines[CHECKPOINT_R1 - 1].replace(signature.encode(), other.encode())
    run.ledger.write_bytes(b"".join(lines))

    # Execute
    result = verify(run)

    # Assert
    assert any(f.line == CHECKPOINT_R1 for f in result.problems), result.problems


def test_an_unreadable_first_line_is_reported_without_a_pinned_key(run: AuditedRun) -> None:
    # Prepare
    lines = run.lines()
    lines[0] = b"x" + lines[0][1:]
    run.ledger.write_bytes(b"".join(lines))

    # Execute
    result = verify(run, pinned=False)

    # Assert
    found(result, "json", 1)


def test_an_altered_attestation_is_reported_when_release_logs_are_cross_checked(run: AuditedRun) -> None:
    # Prepare
    lines = run.lines()
    lines[ACCEPTED_R1 - 1] = lines[ACCEPTED_R1 - 1].replace(b'"statement":"{', b'"statement":"x', 1)
    run.ledger.write_bytes(b"".join(lines))

    # Execute
    result = verify(run)

    # Assert
    found(result, "entry hash", ACCEPTED_R1)


# ------------------------------------------------------------------------ deletions, reordering, truncation

def test_a_deleted_entry_is_found(run: AuditedRun) -> None:
    # Prepare
    lines = run.lines()
    del lines[ACCEPTED_R1 - 1]
    run.ledger.write_bytes(b"".join(lines))

    # Execute
    result = verify(run)

    # Assert
    finding = found(result, "sequence", ACCEPTED_R1)
    assert f"expected entry {ACCEPTED_R1 - 1}, found {ACCEPTED_R1}" in finding.message
    found(result, "hash link", ACCEPTED_R1)
    found(result, "results", LEDGER_LINES - 1)


def test_two_reordered_entries_are_found(run: AuditedRun) -> None:
    # Prepare
    lines = run.lines()
    lines[5], lines[6] = lines[6], lines[5]
    run.ledger.write_bytes(b"".join(lines))

    # Execute
    result = verify(run)

    # Assert
    found(result, "sequence", 6)
    found(result, "hash link", 6)
    found(result, "sequence", 7)


def test_a_ledger_cut_at_a_line_boundary_misses_its_closing_entry(run: AuditedRun) -> None:
    # Prepare
    run.ledger.write_bytes(b"".join(run.lines()[:CHECKPOINT_R1]))

    # Execute
    result = verify(run)

    # Assert
    assert "run-finished" in found(result, "closing entry", CHECKPOINT_R1).message
    assert f"results.json records {LEDGER_LINES} entries" in found(result, "results", CHECKPOINT_R1).message


def test_a_ledger_cut_at_a_line_boundary_is_found_without_results_json(run: AuditedRun) -> None:
    # Prepare
    run.ledger.write_bytes(b"".join(run.lines()[:-1]))
    run.results.unlink()

    # Execute
    result = verify(run)
    alone = verify(run, logs=False)

    # Assert: the institution holds the receipt of the witness reply cut off; cut before run-finished, the ledger
    # alone shows it
    found(result, "cross-check", LOG_LINES, log="institution-1/release-log.jsonl")
    run.ledger.write_bytes(b"".join(run.lines()[:CLOSING - 1]))
    found(verify(run, logs=False), "closing entry", CLOSING - 1)
    assert alone.ok  # the final head covers the closing entry, and both cosigned it: only the logs know more


def test_a_ledger_cut_mid_line_is_found_as_truncation(run: AuditedRun) -> None:
    # Prepare
    data = run.ledger.read_bytes()
    run.ledger.write_bytes(data[: len(data) - 40])

    # Execute
    result = verify(run)

    # Assert
    found(result, "truncation", LEDGER_LINES)
    found(result, "json", LEDGER_LINES)


def test_a_resumed_ledger_cut_after_its_first_closing_entry_is_found_by_results_json(tmp_path: Path) -> None:
    # Prepare
    first = audited_run(tmp_path, rounds=1)
    closed_once = first.ledger.read_bytes()
    audited_run(tmp_path, rounds=1, identities=first.identities)  # the server restarts: same run folder, same ledger
    first.ledger.write_bytes(closed_once)

    # Execute
    result = verify(first)

    # Assert: it ends on a closing entry, its final head cosigned, but results.json and the institutions' logs
    # (the heads they cosigned later, their releases) know better
    assert {f.check for f in result.problems} == {"results", "cross-check", "truncation", "receipt"}
    assert [f.line for f in result.problems if f.check == "results"] == [14]
    assert len(closed_once.splitlines()) == 14


# ------------------------------------------------------------------------------------------- signatures

def test_a_signature_taken_from_another_entry_is_found(run: AuditedRun) -> None:
    # Prepare
    entries = entries_of(run.ledger)
    entries[CHECKPOINT_R1 - 1]["sig"] = entries[CHECKPOINT_R1]["sig"]
    write_lines(run.ledger, entries)

    # Execute
    result = verify(run)

    # Assert
    assert "bad signature" in found(result, "signature", CHECKPOINT_R1).message
    assert {f.line for f in result.problems if f.check not in WITNESS_CHECKS} == {CHECKPOINT_R1}
    found(result, "fork", 4, log="institution-0/release-log.jsonl")


@settings(max_examples=30, deadline=None)
@given(garbage=st.text(st.characters(blacklist_categories=("Cs",)), max_size=100) | st.binary(max_size=80).map(
    lambda raw: base64.b64encode(raw).decode("ascii")))
def test_a_garbage_signature_is_found(recorded: AuditedRun, scratch: Path, garbage: str) -> None:
    # Prepare
    entries = entries_of(recorded.ledger)
    assume(garbage != entries[CHECKPOINT_R1 - 1]["sig"])
    entries[CHECKPOINT_R1 - 1]["sig"] = garbage
    write_lines(scratch, entries)

    # Execute
    result = verify_ledger(scratch, coordinator_key=recorded.coordinator_key, allow_list=recorded.allow_list)

    # Assert
    assert {(f.line, f.check) for f in result.problems if f.check not in WITNESS_CHECKS} == {(CHECKPOINT_R1, "signature")}


def test_a_modified_entry_re_signed_with_another_key_is_found(run: AuditedRun) -> None:
    # Prepare
    intruder = Signer.generate(kinds.COORDINATOR)
    entries = entries_of(run.ledger)
    entries[CHECKPOINT_R1 - 1]["body"]["student_accuracy"] = 0.99
    write_lines(run.ledger, forge(entries, intruder, start=CHECKPOINT_R1 - 1))

    # Execute
    result = verify(run)

    # Assert
    assert f"signed by key {intruder.key_id}" in found(result, "signer", CHECKPOINT_R1).message
    assert all(f.check in ("signer", "results", *WITNESS_CHECKS) for f in result.problems)


def test_a_modified_entry_with_its_hash_recomputed_but_not_re_signed_is_found(run: AuditedRun) -> None:
    # Prepare
    entries = entries_of(run.ledger)
    entries[CHECKPOINT_R1 - 1]["body"]["student_accuracy"] = 0.99
    entries[CHECKPOINT_R1 - 1]["hash"] = entry_hash(entries[CHECKPOINT_R1 - 1])
    write_lines(run.ledger, entries)

    # Execute
    result = verify(run)

    # Assert
    assert any(f.line == CHECKPOINT_R1 for f in result.problems), result.problems
    found(result, "hash link", CHECKPOINT_R1 + 1)


def test_a_ledger_rewritten_under_another_key_fails_against_the_pinned_key(run: AuditedRun) -> None:
    # Prepare
    intruder = Signer.generate(kinds.COORDINATOR)
    pinned = run.coordinator_key
    entries = entries_of(run.ledger)
    entries[0]["body"]["key"] = intruder.public
    forged = forge(entries, intruder)
    write_lines(run.ledger, forged)
    audit = json.loads(run.results.read_text(encoding="utf-8"))["audit"]
    audit.update(ledger_head=forged[-1]["hash"], coordinator_key=intruder.public)
    run.results.write_text(json.dumps({"audit": audit}), encoding="utf-8")

    # Execute
    result = verify(run, coordinator_key=pinned)
    unpinned = verify(run, pinned=False)

    # Assert
    assert "is not the pinned key" in found(result, "trust anchor", 1).message
    assert {f.line for f in result.problems if f.check == "signer"} == set(range(1, LEDGER_LINES + 1))
    assert any("not pinned" in note for note in unpinned.notes)


def test_a_wrong_pinned_coordinator_key_fails_every_entry(run: AuditedRun) -> None:
    # Prepare
    wrong = Signer.generate(kinds.COORDINATOR).public

    # Execute
    result = verify(run, coordinator_key=wrong)

    # Assert
    found(result, "trust anchor", 1)
    assert {f.line for f in result.problems if f.check == "signer"} == set(range(1, LEDGER_LINES + 1))


# ------------------------------------------------------------------------------------- replays, attestations

def test_an_entry_replayed_from_another_run_with_the_same_coordinator_key_is_found(run: AuditedRun, tmp_path: Path) -> None:
    # Prepare
    other = audited_run(tmp_path / "other", run_id=RUN_ID - 1, identities=run.identities,
                        coordinator_key=str(run.folder / "coordinator.key"))
    lines = run.lines()
    lines[ACCEPTED_R1 - 1] = other.lines()[ACCEPTED_R1 - 1]
    run.ledger.write_bytes(b"".join(lines))

    # Execute
    result = verify(run)

    # Assert
    assert "replayed from another log" in found(result, "log id", ACCEPTED_R1).message
    found(result, "hash link", ACCEPTED_R1)
    found(result, "hash link", ACCEPTED_R1 + 1)
    assert not [f for f in result.problems if f.check == "signer"]


def test_an_entry_replayed_from_another_coordinators_run_is_found(run: AuditedRun, tmp_path: Path) -> None:
    # Prepare
    other = audited_run(tmp_path / "other", identities=run.identities)
    lines = run.lines()
    lines.insert(CHECKPOINT_R1, other.lines()[CHECKPOINT_R1])
    run.ledger.write_bytes(b"".join(lines))

    # Execute
    result = verify(run)

    # Assert
    for check in ("log id", "signer", "hash link"):
        found(result, check, CHECKPOINT_R1 + 1)
    found(result, "sequence", CHECKPOINT_R1 + 2)


def test_an_attestation_replayed_from_another_run_is_found(run: AuditedRun, tmp_path: Path) -> None:
    # Prepare: the coordinator itself swaps in last run's signed release of the same institution, and re-signs
    other = audited_run(tmp_path / "other", run_id=RUN_ID - 1, identities=run.identities)
    entries = entries_of(run.ledger)
    entries[ACCEPTED_R1 - 1]["body"]["attestation"] = entries_of(other.ledger)[ACCEPTED_R1 - 1]["body"]["attestation"]
    write_lines(run.ledger, forge(entries, run.coordinator, start=ACCEPTED_R1 - 1))

    # Execute
    result = verify(run)

    # Assert
    finding = found(result, "attestation", ACCEPTED_R1)
    assert f"made for run {RUN_ID - 1}" in finding.message and "(replayed)" in finding.message
    assert not [f for f in result.problems if f.check in ("signature", "hash link", "signer")]


@pytest.mark.parametrize(("name", "expected"), [
    ("intruder", "institution 'intruder' is not on the allow-list"),
    ("institution-0", "but the allow-list key of 'institution-0' is"),
])
def test_an_accepted_reply_attested_by_an_unknown_key_is_found(run: AuditedRun, name: str, expected: str) -> None:
    # Prepare
    entries = entries_of(run.ledger)
    body = entries[ACCEPTED_R1 - 1]["body"]
    rogue = attest(Signer.generate(name), run_id=RUN_ID, round_=1, node_id=int(body["node_id"]),
                   public_fingerprint=FINGERPRINT, query_sha256=entries[2]["body"]["query_sha256"],
                   payload_sha256=body["payload_sha256"], payload_bytes=body["payload_bytes"], payload={},
                   data_categories=[])
    body["attestation"] = rogue.as_dict()
    write_lines(run.ledger, forge(entries, run.coordinator, start=ACCEPTED_R1 - 1))

    # Execute
    result = verify(run, logs=False)

    # Assert
    assert expected in found(result, "attestation", ACCEPTED_R1).message


def test_an_accepted_reply_without_attestation_is_found(run: AuditedRun) -> None:
    # Prepare
    entries = entries_of(run.ledger)
    entries[ACCEPTED_R2 - 1]["body"]["attestation"] = None
    write_lines(run.ledger, forge(entries, run.coordinator, start=ACCEPTED_R2 - 1))

    # Execute
    result = verify(run, logs=False)

    # Assert
    assert "accepted without an attestation" in found(result, "attestation", ACCEPTED_R2).message


def test_an_accepted_reply_whose_recorded_digest_differs_from_the_attested_one_is_found(run: AuditedRun) -> None:
    # Prepare
    entries = entries_of(run.ledger)
    entries[ACCEPTED_R1 - 1]["body"]["payload_sha256"] = "0" * 64
    write_lines(run.ledger, forge(entries, run.coordinator, start=ACCEPTED_R1 - 1))

    # Execute
    result = verify(run, logs=False)

    # Assert
    assert "payload_sha256" in found(result, "attestation", ACCEPTED_R1).message


def test_a_reply_recorded_outside_its_round_is_found(run: AuditedRun) -> None:
    # Prepare
    entries = entries_of(run.ledger)
    entries[CHECKPOINT_R1 - 2]["body"]["round"] = 2  # the aggregation of round 1, claimed for round 2
    write_lines(run.ledger, forge(entries, run.coordinator, start=CHECKPOINT_R1 - 2))

    # Execute
    result = verify(run)

    # Assert
    assert "the open round is 1" in found(result, "round order", CHECKPOINT_R1 - 1).message


def test_an_allow_list_other_than_the_recorded_one_is_found(run: AuditedRun) -> None:
    # Prepare
    allow_list = dict(run.allow_list, **{"institution-9": Signer.generate("institution-9").public})

    # Execute
    result = verify(run, allow_list=allow_list)

    # Assert
    assert "['institution-9']" in found(result, "allow-list", 1).message


# ------------------------------------------------------------------------------------ companions, client logs

def test_a_replaced_student_checkpoint_is_found(run: AuditedRun) -> None:
    # Prepare
    run.student.write_bytes(b"other weights")

    # Execute
    result = verify(run)

    # Assert
    assert [f.check for f in result.problems] == ["student checkpoint"]
    assert result.problems[0].line == 12


@pytest.mark.parametrize("text", ["[1]", '{"audit": "x"}'])
def test_a_malformed_results_json_is_reported_not_raised(run: AuditedRun, text: str) -> None:
    # Prepare
    run.results.write_text(text, encoding="utf-8")

    # Execute
    result = verify(run)

    # Assert
    assert any("results.json" in f.message for f in result.problems), result.problems


def test_a_release_missing_from_the_ledger_fails_the_cross_check(run: AuditedRun) -> None:
    # Prepare: institution-0 logs (and sends) one more release that the ledger never records
    node, identity = next(iter(run.identities.items()))
    signed_reply(identity, make_query(1), node)

    # Execute
    result = verify(run)

    # Assert
    finding = found(result, "cross-check", LOG_LINES + 1, log="release-log.jsonl")
    assert "is not in the ledger, or was changed there" in finding.message
    assert len(result.problems) == 1


def test_an_altered_release_fails_the_cross_check_both_ways(run: AuditedRun) -> None:
    # Prepare: the institution rewrites its own log (validly re-signed) to claim another payload in round 1
    node, identity = next(iter(run.identities.items()))
    entries = entries_of(identity.release_log)
    fields = json.loads(entries[1]["body"]["attestation"]["statement"])
    claimed = attest(identity.signer, run_id=RUN_ID, round_=1, node_id=node, public_fingerprint=FINGERPRINT,
                     query_sha256=fields["query_sha256"], payload_sha256="1" * 64, payload_bytes=fields["payload_bytes"],
                     payload=fields["payload"], data_categories=fields["data_categories"])
    entries[1]["body"]["attestation"] = claimed.as_dict()
    write_lines(identity.release_log, forge(entries, identity.signer, start=1))

    # Execute
    result = verify(run)

    # Assert
    found(result, "cross-check", 2, log="release-log.jsonl")
    ledger_side = [f for f in result.problems if f.log.endswith("ledger.jsonl") and f.check == "cross-check"]
    assert [(f.seq, f.kind) for f in ledger_side] == [(ACCEPTED_R1 - 1, kinds.REPLY_ACCEPTED)]
    assert "holds a release by 'institution-0' in round 1 that its log does not" in ledger_side[0].message
    assert "entry 3, reply-accepted" in str(ledger_side[0])


def test_a_byte_changed_in_a_release_log_is_found(run: AuditedRun) -> None:
    # Prepare
    log = run.client_logs[1]
    lines = log.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"round":2', b'"round":3', 1)
    log.write_bytes(b"".join(lines))

    # Execute
    result = verify(run)

    # Assert
    found(result, "entry hash", 3, log="release-log.jsonl")


def test_an_accepted_reply_missing_from_the_institutions_log_fails_the_cross_check(run: AuditedRun) -> None:
    # Prepare: institution-1's log loses its round-2 release and what followed (re-chained, so the log itself is
    # consistent)
    identity = run.identities[102]
    entries = entries_of(identity.release_log)[:2]
    write_lines(identity.release_log, forge(entries, identity.signer))

    # Execute
    result = verify(run)

    # Assert
    finding, witness_reply = result.problems
    assert (finding.log.split("/")[-1], finding.check, finding.seq) == ("ledger.jsonl", "cross-check", ACCEPTED_R2)
    assert "'institution-1' in round 2 that its log does not" in finding.message
    assert witness_reply.check == "cross-check" and witness_reply.seq == LEDGER_LINES - 1


def test_a_release_log_re_signed_with_a_key_off_the_allow_list_is_found(run: AuditedRun) -> None:
    # Prepare
    identity = run.identities[101]
    impostor = Signer.generate(identity.signer.name)
    write_lines(identity.release_log, forge(entries_of(identity.release_log), impostor))

    # Execute
    result = verify(run)

    # Assert
    found(result, "trust anchor", 1, log="release-log.jsonl")
    found(result, "signer", 2, log="release-log.jsonl")


def test_a_release_log_of_an_institution_off_the_allow_list_is_found(run: AuditedRun, tmp_path: Path) -> None:
    # Prepare
    stranger = make_identity(tmp_path / "stranger", "stranger")
    signed_reply(stranger, make_query(1), 103)

    # Execute
    result = verify(run, client_logs=[*run.client_logs, stranger.release_log])

    # Assert
    assert "'stranger' is not on the allow-list" in found(result, "allow-list", 1, log="release-log.jsonl").message


def test_read_chain_reports_a_missing_file(tmp_path: Path) -> None:
    # Execute
    chain = read_chain(tmp_path / "absent.jsonl")

    # Assert
    assert [(f.check, f.message) for f in chain.problems] == [("file", "not found")]


def test_an_aggregation_naming_a_node_without_an_accepted_reply_is_found(run: AuditedRun) -> None:
    # Prepare: the coordinator (its own key) drops node 102's accepted reply of round 2 but still aggregates it
    entries = entries_of(run.ledger)
    del entries[10 - 1]
    for seq, entry in enumerate(entries):
        entry["seq"] = seq
    write_lines(run.ledger, forge(entries, run.coordinator, start=10 - 1))

    # Execute
    result = verify(run, logs=False)

    # Assert: the aggregation (now line 10) is named; so is the results.json count
    problem = found(result, "aggregated", 10)
    assert "round 2 aggregates node(s) ['102'] without an accepted soft-labels reply in that round" in problem.message
    assert {f.check for f in result.problems} - WITNESS_CHECKS == {"aggregated", "results"}


# ------------------------------------------------------------------------------------------- witnessing

def test_a_dropped_cosignature_is_found(run: AuditedRun) -> None:
    # Prepare: the coordinator removes institution-1's cosignature of the final head and re-chains with its own key
    entries = [e for e in entries_of(run.ledger) if not (e["kind"] == kinds.COSIGNED
                                                          and e["body"]["institution_id"] == "institution-1")]
    for seq, entry in enumerate(entries):
        entry["seq"] = seq
    write_lines(run.ledger, forge(entries, run.coordinator, start=TREE_HEAD + 1))

    # Execute
    result = verify(run, logs=False)

    # Assert
    assert "the final tree head (size 14) lacks the cosignature of ['institution-1']" in found(result, "witness", None).message
    assert verify(run, logs=False, quorum=1).problems == [f for f in result.problems if f.check == "results"]


def test_an_accepted_reply_left_out_is_proved_by_its_receipt(run: AuditedRun) -> None:
    # Prepare: the coordinator drops institution-0's round-1 reply and rewrites the rest with its own key, tree heads
    # and cosignatures included (it cannot make the institutions cosign the new history)
    entries = entries_of(run.ledger)[:CLOSING]
    del entries[ACCEPTED_R1 - 1]
    for seq, entry in enumerate(entries):
        entry["seq"] = seq
    write_lines(run.ledger, forge(entries, run.coordinator, start=ACCEPTED_R1 - 1))

    # Execute
    result = verify(run)

    # Assert: the institution's receipt for the entry proves it was accepted
    receipt = found(result, "receipt", 5, log="institution-0/release-log.jsonl")
    assert "holds a receipt for entry 3 (its accepted reply of round 1)" in receipt.message
    found(result, "truncation", 4, log="institution-0/release-log.jsonl")


def test_a_history_forked_for_one_institution_is_found_from_its_log(run: AuditedRun, tmp_path: Path) -> None:
    # Prepare: institution-1 was shown (and cosigned) a head of a rewritten ledger: its log holds another root
    identity = run.identities[102]
    entries = entries_of(identity.release_log)
    cosigned = next(e for e in entries if e["kind"] == kinds.COSIGNED)
    cosigned["body"]["root"] = "ab" * 32
    write_lines(identity.release_log, forge(entries, identity.signer, start=entries.index(cosigned)))

    # Execute
    result = verify(run)

    # Assert
    assert "'institution-1' cosigned another history: at 14 entries" in \
        found(result, "fork", 4, log="institution-1/release-log.jsonl").message


def test_a_ledger_re_signed_under_another_key_is_found_from_the_logs_without_a_pinned_key(run: AuditedRun) -> None:
    # Prepare: the whole ledger re-signed under a fresh key, its genesis naming it
    intruder = Signer.generate(kinds.COORDINATOR)
    entries = entries_of(run.ledger)[:CLOSING]
    entries[0]["body"]["key"] = intruder.public
    write_lines(run.ledger, forge(entries, intruder))

    # Execute
    result = verify(run, pinned=False)

    # Assert: the institutions cosigned heads of another key; the end is not witnessed
    assert "cosigned heads signed by another coordinator key" in \
        found(result, "witness", 4, log="institution-0/release-log.jsonl").message
    found(result, "witness", CLOSING)
