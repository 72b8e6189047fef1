"""Verification of a coordinator ledger and of institutions' release logs, and their cross-check.

Every check that fails becomes a `Finding` naming the file, the line, the entry and the check; the
verifier never stops at the first problem, so an auditor sees everything that is wrong at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.audit import kinds
from common.audit.attestation import Attestation, check_attestation, read_statement
from common.audit.canonical import canonical
from common.audit.chain import Chain as Chain  # re-exported: readers of a verification use both
from common.audit.chain import Finding as Finding
from common.audit.keys import key_id, verify_signature
from common.audit.ledger import CORE_FIELDS, ENTRY_FIELDS, GENESIS_PREV, OPENED, entry_hash
from common.audit.verify_witness import Tree, after_closing, check_ledger_witnessing, check_log_witnessing
from common.errors import AuditError, ConfigError


@dataclass
class Verification:
    problems: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)  # log name -> entries read

    @property
    def ok(self) -> bool:
        return not self.problems


def read_chain(path: Path | str, trusted_key: str | None = None) -> Chain:
    """Parse a log and check its structure: JSON, fields, canonical form, sequence, log id, hash links,
    entry hashes, one signer (the trusted key when given) and every signature."""
    chain = Chain(Path(path))
    if not chain.path.is_file():
        chain.problem(None, None, "file", "not found")
        return chain
    data = chain.path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        chain.problem(len(lines), None, "truncation", "the last line is incomplete (no final newline): the file was cut")
    prev, seq, ledger_id, signer_key, signer_name = GENESIS_PREV, 0, None, trusted_key, None
    for number, raw in enumerate(lines, start=1):
        entry = _parse(chain, number, raw)
        if entry is None:
            continue
        if number == 1:
            ledger_id = entry["ledger"]
            if entry["kind"] != OPENED:
                chain.problem(number, entry, "genesis", f"the first entry must be {OPENED!r}: the start of the log is missing")
            if signer_key is None:
                signer_key = entry["key"]
        if entry["seq"] != seq:
            chain.problem(number, entry, "sequence", f"expected entry {seq}, found {entry['seq']} (entries deleted, inserted or reordered)")
        if entry["ledger"] != ledger_id:
            chain.problem(number, entry, "log id", f"entry belongs to log {entry['ledger']}, not {ledger_id} (replayed from another log)")
        if entry["prev"] != prev:
            chain.problem(number, entry, "hash link", f"prev is {entry['prev'][:16]}..., the previous entry's hash is {prev[:16]}...")
        if entry_hash(entry) != entry["hash"]:
            chain.problem(number, entry, "entry hash", "the content does not match its hash (the entry was altered)")
        if signer_key is None:
            signer_key = entry["key"]  # the first line did not parse: take the first readable entry's key
        if signer_name is None and entry["kind"] == OPENED and isinstance(entry["body"].get("signer"), str):
            signer_name = entry["body"]["signer"]
        if entry["key"] != signer_key:
            chain.problem(number, entry, "signer", f"signed by key {key_id(entry['key'])}, this log's key is {key_id(signer_key)}")
        if signer_name is not None and entry["signer"] != signer_name:
            chain.problem(number, entry, "signer", f"names its signer {entry['signer'][:40]!r}, this log's signer is {signer_name!r}")
        try:
            verify_signature(entry["key"], entry["sig"], entry["hash"].encode("ascii"), "entry")
        except AuditError as error:
            chain.problem(number, entry, "signature", str(error).removeprefix("entry: "))
        chain.entries.append((number, entry))
        prev, seq = entry["hash"], entry["seq"] + 1
    if trusted_key and chain.entries and chain.entries[0][1]["key"] != trusted_key:
        chain.problem(chain.entries[0][0], chain.entries[0][1], "trust anchor",
                      f"the log's key {key_id(chain.entries[0][1]['key'])} is not the pinned key {key_id(trusted_key)}")
    return chain


def _parse(chain: Chain, number: int, raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        chain.problem(number, None, "json", "not a JSON object (the line was altered or cut)")
        return None
    if not isinstance(entry, dict):
        chain.problem(number, None, "json", "not a JSON object")
        return None
    missing = [name for name in ENTRY_FIELDS if name not in entry]
    types_ok = (isinstance(entry.get("seq"), int)
                and all(isinstance(entry.get(n), str) for n in ("ledger", "kind", "prev", "hash", "key", "sig"))
                and isinstance(entry.get("body"), dict))
    if missing or not types_ok:
        chain.problem(number, entry, "fields", f"missing or ill-typed fields {missing or list(CORE_FIELDS)}")
        return None
    try:
        if canonical(entry) != raw:
            chain.problem(number, entry, "canonical form", "the line is not the RFC 8785 form of its entry (bytes were altered)")
    except AuditError as error:
        chain.problem(number, entry, "canonical form", str(error))
    return entry


def verify_ledger(
    ledger: Path | str, *, coordinator_key: str | None = None, allow_list: dict[str, str] | None = None,
    client_logs: Iterable[Path | str] = (), quorum: int | None = None,
) -> Verification:
    """Verify a coordinator ledger, then each institution's release log against it. `quorum`: cosignatures the
    final tree head needs (default: every institution present at the end of the run; 0: none)."""
    result = Verification()
    client_logs = list(client_logs)
    missing = [str(p) for p in (ledger, *client_logs) if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"not found: {', '.join(missing)}; give the run folder's ledger.jsonl and each "
                          f"institution's release-log.jsonl")
    chain = read_chain(ledger, coordinator_key)
    result.checked[chain.path.name] = len(chain.entries)
    if coordinator_key is None and chain.entries:
        result.notes.append(f"coordinator key not pinned: taken from the ledger itself (key {key_id(chain.entries[0][1]['key'])}); "
                            f"pass --coordinator-key to check it against a key you trust")
    genesis = chain.genesis
    recorded = genesis["body"].get("allow_list") if genesis else None
    if allow_list is not None and recorded is not None and allow_list != recorded:
        changed = {name for name, _ in set(allow_list.items()) ^ set(recorded.items())}
        chain.problem(1, genesis, "allow-list", f"the ledger's allow-list differs from the one given, for {sorted(changed)}")
    keys = allow_list if allow_list is not None else recorded
    run_ids = _check_semantics(chain, keys)
    tree = Tree(chain.path.read_bytes().splitlines())
    check_ledger_witnessing(chain, tree, keys, quorum, result.notes)
    result.problems += chain.problems
    _check_companions(chain, result)
    for log in client_logs:
        _check_client_log(Path(log), keys, chain, run_ids, result, tree)
    return result


def _check_semantics(chain: Chain, keys: dict[str, str] | None) -> set[str]:
    """Attestations of accepted replies (against the query of their round and its phase), round order, replies of
    the run's method, aggregations of accepted replies only, and a closing entry."""
    run_ids = {e["body"].get("run_id") for _, e in chain.entries if e["kind"] == kinds.RUN_STARTED}
    open_round, open_query, resumed_after, method = None, None, None, None
    accepted: dict[tuple[Any, Any], set[str]] = {}  # (round, phase) -> nodes whose reply was accepted since it opened
    for index, (number, entry) in enumerate(chain.entries):
        body, kind = entry["body"], entry["kind"]
        if kind == kinds.RUN_RESUMED:
            _check_resume(chain, index)
            resumed_after = body.get("checkpoint_round")
        if kind in (kinds.ROUND_OPENED, kinds.EXCHANGE_OPENED) and resumed_after is not None:
            if isinstance(resumed_after, int) and body.get("round") != resumed_after + 1:
                chain.problem(number, entry, "resume", f"the run resumed after round {resumed_after}, but opens round {body.get('round')}")
            resumed_after = None
        if kind == kinds.RUN_STARTED:
            method = body.get("method")
        if kind in (kinds.ROUND_OPENED, kinds.DIGEST_OPENED, kinds.EXCHANGE_OPENED):
            open_round, open_query = body.get("round"), body.get("query_sha256")
            accepted[(body.get("round"), _opened_phase(entry))] = set()
        elif kind in (kinds.REPLY_ACCEPTED, kinds.REPLY_REJECTED, kinds.AGGREGATED) and body.get("round") != open_round:
            chain.problem(number, entry, "round order", f"about round {body.get('round')}, but the open round is {open_round}")
        if kind in (kinds.REPLY_ACCEPTED, kinds.REPLY_REJECTED) and body.get("phase") != kinds.WITNESS_PHASE \
                and (method == "fedavg") != (body.get("phase") == kinds.FEDAVG_PHASE):
            chain.problem(number, entry, "phase", f"a reply of phase {body.get('phase')!r} in a run of method {method!r}: "
                                                  f"a FedAvg run exchanges weights only, other runs never do")
        if kind == kinds.REPLY_ACCEPTED:
            _check_accepted(chain, number, entry, keys, run_ids, open_query)
            accepted.setdefault((body.get("round"), body.get("phase")), set()).add(str(body.get("node_id")))
        if kind == kinds.AGGREGATED:
            _check_aggregated(chain, number, entry, accepted)
    ending = [(n, e) for n, e in chain.entries if not after_closing(e)]  # the final witnessing may follow the close
    if ending and ending[-1][1]["kind"] not in kinds.CLOSING:
        number, last = ending[-1]
        chain.problem(number, last, "closing entry",
                      f"the ledger ends without {' or '.join(kinds.CLOSING)}: it was truncated, or the run has not ended")
    return {r for r in run_ids if isinstance(r, str)}


def _opened_phase(entry: dict[str, Any]) -> Any:
    """The phase of the replies an opening entry asks for."""
    return {kinds.ROUND_OPENED: "soft-labels", kinds.DIGEST_OPENED: "digest"}.get(entry["kind"], entry["body"].get("phase"))


def _check_aggregated(chain: Chain, number: int, entry: dict[str, Any], accepted: dict[tuple[Any, Any], set[str]]) -> None:
    """An aggregation names only nodes whose reply of its phase was accepted in its round (the soft labels, or
    under FedAvg the trained weights): the record proves the coordinator used only verified releases."""
    body = entry["body"]
    phase = kinds.FEDAVG_PHASE if body.get("rule") == kinds.FEDAVG_PHASE else "soft-labels"
    nodes = body.get("nodes")
    if not isinstance(nodes, list):
        chain.problem(number, entry, "aggregated", "names no list of nodes")
        return
    unverified = sorted({str(n) for n in nodes} - accepted.get((body.get("round"), phase), set()))
    if unverified:
        chain.problem(number, entry, "aggregated", f"round {body.get('round')} aggregates node(s) {unverified} without an "
                                                   f"accepted {phase} reply in that round")


def _check_resume(chain: Chain, index: int) -> None:
    """A `run-resumed` entry follows its run's `run-started` and names an earlier entry of this chain, by seq and
    hash, as its checkpoint (a `student-checkpoint` of the round it resumes after, or for a run without one yet
    the last entry before the stop)."""
    number, entry = chain.entries[index]
    body = entry["body"]
    seq, digest, round_ = body.get("checkpoint_seq"), body.get("checkpoint_hash"), body.get("checkpoint_round")
    previous = chain.entries[index - 1][1] if index else {}
    if previous.get("kind") != kinds.RUN_STARTED or previous["body"].get("run_id") != body.get("run_id"):
        chain.problem(number, entry, "resume", f"does not follow the run-started entry of run {body.get('run_id')}")
    target = next((e for _, e in chain.entries if e["seq"] == seq), None) if isinstance(seq, int) and seq < entry["seq"] else None
    if target is None:
        chain.problem(number, entry, "resume", f"its checkpoint entry {seq} is not an earlier entry of this ledger")
    elif target["hash"] != digest:
        chain.problem(number, entry, "resume", f"its checkpoint entry {seq} has hash {target['hash'][:16]}..., "
                                               f"the resume names {str(digest)[:16]}...")
    elif target["kind"] == kinds.CHECKPOINT and target["body"].get("round") != round_:
        chain.problem(number, entry, "resume", f"resumes after round {round_}, but its checkpoint entry {seq} is "
                                               f"of round {target['body'].get('round')}")


def abandoned_releases(chain: Chain) -> dict[str, int]:
    """Run id -> the round after which a resume abandoned that run's later rounds."""
    found: dict[str, int] = {}
    for _, entry in chain.entries:
        if entry["kind"] != kinds.RUN_RESUMED or not isinstance(entry["body"].get("checkpoint_round"), int):
            continue
        for run_id in entry["body"].get("interrupted_run_ids") or []:
            found[str(run_id)] = min(found.get(str(run_id), entry["body"]["checkpoint_round"]), entry["body"]["checkpoint_round"])
    return found


def _check_accepted(chain: Chain, number: int, entry: dict[str, Any], keys: dict[str, str] | None, run_ids: set[Any],
                    open_query: Any = None) -> None:
    """An accepted reply's attestation verifies, names this ledger's run, its round's query (one digest, or the node's
    when each node got its own message), and states a payload of its phase: FedAvg weights in phase "fedavg" only."""
    body = entry["body"]
    attestation = _attestation(body)
    if keys is None:
        return  # the run had no allow-list: replies were not signed-verified (recorded in ledger-opened)
    if attestation is None:
        chain.problem(number, entry, "attestation", f"reply of node {body.get('node_id')} accepted without an attestation")
        return
    expected = {"round": body.get("round"), "node_id": body.get("node_id"), "payload_sha256": body.get("payload_sha256"),
                "payload_bytes": body.get("payload_bytes"), "institution_id": body.get("institution_id")}
    try:
        fields = check_attestation(attestation, keys, expected, "attestation")
        if fields["run_id"] not in run_ids:
            chain.problem(number, entry, "attestation",
                          f"made for run {fields['run_id']}, this ledger's runs are {sorted(run_ids)} (replayed)")
        query = open_query.get(str(body.get("node_id"))) if isinstance(open_query, dict) else open_query
        if isinstance(query, str) and query and fields["query_sha256"] != query:
            chain.problem(number, entry, "attestation", f"signed for query {str(fields['query_sha256'])[:16]}..., the "
                                                        f"round's query is {query[:16]}...")
        payload = fields["payload"].get("kind") if isinstance(fields["payload"], dict) else None
        if (payload == kinds.FEDAVG_PAYLOAD) != (body.get("phase") == kinds.FEDAVG_PHASE):
            chain.problem(number, entry, "attestation", f"states a payload of kind {payload!r}, accepted in phase "
                                                        f"{body.get('phase')!r}")
    except AuditError as error:
        chain.problem(number, entry, "attestation", str(error).removeprefix("attestation: "))


def _check_companions(chain: Chain, result: Verification) -> None:
    """The run folder's results.json and student checkpoint against the ledger, when they lie beside it."""
    if not chain.entries:
        return
    folder, (number, last) = chain.path.parent, chain.entries[-1]
    checkpoints = [(n, e) for n, e in chain.entries if e["kind"] == kinds.CHECKPOINT]
    student = folder / (checkpoints[-1][1]["body"].get("file", "") if checkpoints else "")
    if checkpoints and student.is_file():
        digest = hashlib.sha256(student.read_bytes()).hexdigest()
        if digest != checkpoints[-1][1]["body"].get("sha256"):
            n, e = checkpoints[-1]
            result.problems.append(Finding(chain.label, n, e["seq"], e["kind"], "student checkpoint",
                                           f"{student.name} has sha256 {digest[:16]}..., "
                                           f"the ledger recorded {str(e['body'].get('sha256'))[:16]}..."))
    results = folder / "results.json"
    if results.is_file():
        try:
            data = json.loads(results.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            data = None
        audit = data.get("audit", {}) if isinstance(data, dict) else None
        if not isinstance(audit, dict):
            result.problems.append(Finding(chain.label, None, None, None, "results",
                                           "results.json beside the ledger is not readable or its audit section is not an object"))
            audit = {}
        head, count = audit.get("ledger_head"), audit.get("ledger_entries")
        if head is not None and (head != last["hash"] or count != len(chain.entries)):
            result.problems.append(Finding(chain.label, number, last["seq"], last["kind"], "results",
                                           f"results.json records {count} entries ending {str(head)[:16]}..., the ledger has "
                                           f"{len(chain.entries)} ending {last['hash'][:16]}... (entries removed or added)"))


def _check_client_log(path: Path, keys: dict[str, str] | None, ledger: Chain, run_ids: set[str], result: Verification,
                      tree: Tree) -> None:
    """One institution's release log: its own chain, signed by its allow-listed key, against the ledger.

    With no allow-list at all (a run without signature checks) the log's own key is used, and said so.
    """
    probe = read_chain(path)
    genesis = probe.genesis
    institution = genesis["body"].get("institution_id") if genesis else None
    trusted = keys.get(institution) if institution and keys is not None else None
    chain = read_chain(path, trusted) if trusted else probe
    if genesis and trusted is None and keys is not None:
        chain.problem(1, genesis, "allow-list", f"institution {institution!r} is not on the allow-list")
    elif keys is None:
        result.notes.append(f"{chain.label}: no allow-list, so {institution!r}'s key is taken from its own log")
        trusted = genesis["body"].get("key") if genesis else None
    result.checked[str(path)] = len(chain.entries)
    line_of = {entry["seq"]: number for number, entry in ledger.entries}
    in_ledger = {}
    timeouts = set()
    for _, entry in ledger.entries:
        attestation = _attestation(entry["body"])
        if attestation is not None:
            in_ledger[(attestation.statement, attestation.signature)] = entry
        if entry["kind"] == kinds.REPLY_REJECTED and entry["body"].get("check") == "timeout":
            timeouts.add((entry["body"].get("round"), entry["body"].get("node_id")))
    logged, abandoned = set(), abandoned_releases(ledger)
    for number, entry in chain.entries:
        if entry["kind"] != kinds.RELEASE:
            continue
        attestation = _attestation(entry["body"])
        if attestation is None:
            chain.problem(number, entry, "attestation", "release without an attestation")
            continue
        try:
            fields = read_statement(attestation, "attestation")
            if fields["institution_id"] != institution:
                raise AuditError(f"attestation: made by {fields['institution_id']!r}, this is {institution!r}'s log")
            if trusted:
                verify_signature(trusted, attestation.signature, attestation.statement.encode("utf-8"), "attestation")
        except AuditError as error:
            chain.problem(number, entry, "attestation", str(error).removeprefix("attestation: "))
            continue
        if fields["run_id"] not in run_ids:
            continue
        logged.add((attestation.statement, attestation.signature))
        if (attestation.statement, attestation.signature) not in in_ledger:
            where = (fields["round"], fields["node_id"])
            after = abandoned.get(str(fields["run_id"]))
            if after is not None and isinstance(fields["round"], int) and fields["round"] > after:
                result.notes.append(f"{chain.label}: the release of round {where[0]} of run {fields['run_id']} belongs to an "
                                    f"attempt abandoned when the coordinator stopped (the run resumed after round {after})")
            elif where in timeouts:
                result.notes.append(f"{chain.label}: the release of round {where[0]} reached the coordinator after its "
                                    f"round-timeout (ledger records the timeout)")
            else:
                chain.problem(number, entry, "cross-check",
                              f"release of round {fields['round']} (payload {fields['payload_sha256'][:16]}...) "
                              f"is not in the ledger, or was changed there")
    for (statement, signature), entry in in_ledger.items():
        try:
            fields = json.loads(statement)
        except ValueError:
            continue  # an unreadable attestation in the ledger is reported by the ledger's own checks
        if not isinstance(fields, dict):
            continue
        if fields.get("institution_id") == institution and entry["kind"] == kinds.REPLY_ACCEPTED and (statement, signature) not in logged:
            result.problems.append(Finding(ledger.label, line_of.get(entry["seq"]), entry["seq"], entry["kind"], "cross-check",
                                           f"the ledger holds a release by {institution!r} in round {fields.get('round')} "
                                           f"that its log does not"))
    check_log_witnessing(ledger, chain, tree, institution)
    result.problems += chain.problems


def abandoned_entries(entries: Iterable[dict[str, Any]]) -> set[int]:
    """Seqs of the round entries (round-opened, replies, aggregated, checkpoints...) of attempts that a
    resumed run abandoned: those between a `run-resumed` entry and the checkpoint it resumed from."""
    entries = list(entries)
    abandoned: set[int] = set()
    numbered = [e for e in entries if isinstance(e.get("seq"), int) and isinstance(e.get("body"), dict)]
    for resume in (e for e in numbered if e.get("kind") == kinds.RUN_RESUMED):
        start = resume["body"].get("checkpoint_seq")
        if not isinstance(start, int):
            continue
        abandoned |= {e["seq"] for e in numbered if start < e["seq"] < resume["seq"] and e.get("kind") in kinds.ROUND_WORK}
    return abandoned


def _attestation(body: dict[str, Any]) -> Attestation | None:
    value = body.get("attestation")
    if isinstance(value, dict) and isinstance(value.get("statement"), str) and isinstance(value.get("signature"), str):
        return Attestation(value["statement"], value["signature"])
    return None
