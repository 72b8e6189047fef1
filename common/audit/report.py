"""Compliance reports: verify the ledgers of one or more runs, then total what each institution released (JSON, Markdown,
a self-contained HTML page, plots).

Institutions appear by name wherever the record knows it (common.audit.naming); privacy per run and across runs
comes from the attestations and, when given, each institution's own privacy ledger (common.audit.report_privacy);
a run or institution without a mechanism has "no formal privacy guarantee", never epsilon 0. Cosignatures of the
ledger's signed tree heads (entries of kind `cosigned`, issue 17's witnessed ledger) are counted per institution.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.audit import kinds
from common.audit.canonical import utc_now
from common.audit.ledger import OPENED, RESUMED
from common.audit.naming import ATTESTATION, CLAIM, REFUSAL_CHECKS, node_names
from common.audit.report_page import BYTES_PLOT, EPSILON_PLOT, HTML_FILE, JSON_FILE, MARKDOWN_FILE, write_report
from common.audit.report_privacy import guarantee_of, privacy_ledger_summary, summarise_privacy
from common.audit.verify import Chain, abandoned_entries, abandoned_releases, read_chain, verify_ledger
from common.errors import ConfigError

__all__ = ["BYTES_PLOT", "EPSILON_PLOT", "HTML_FILE", "JSON_FILE", "MARKDOWN_FILE", "SCHEMA", "build_report", "write_report"]

SCHEMA = "fedstill.audit-report/1"
REPLIES = (kinds.REPLY_ACCEPTED, kinds.REPLY_REJECTED)
SOFT_LABELS, DIGEST_PAYLOAD = "soft-labels", "digest-losses"  # reply phases; the payload kind of a FedMD digest reply
COSIGNED = kinds.COSIGNED  # an institution's cosignature of a signed tree head (common.audit.witness)


def build_report(
    ledgers: Iterable[Path | str], client_logs: Iterable[Path | str] = (), coordinator_key: str | None = None,
    allow_list: dict[str, str] | None = None, privacy_ledgers: Iterable[tuple[str, Path | str]] = (),
) -> dict[str, Any]:
    """Verify each ledger with the release logs of its run, then aggregate per institution across all runs.

    `privacy_ledgers` are (institution, privacy-ledger.json): each institution's own record of what it spent,
    in every run it joined (common.audit.report_privacy).

    A ledger that does not verify is still read as far as it parses: its run has `verified: false`, the
    institutions it names list it under `unverified_runs`, and the report's `verified` is false.
    A release log is checked against the ledgers whose run ids it holds or whose folder holds it; one
    that holds no release of any given run, against every ledger its institution appears in.
    """
    ledger_paths, log_paths = _existing(ledgers, "ledger"), _existing(client_logs, "release log")
    if not ledger_paths:
        raise ConfigError("no ledger given: pass the ledger.jsonl of at least one run")
    chains = [read_chain(path, coordinator_key) for path in ledger_paths]
    labels = _run_labels(chains)
    logs = [read_chain(path) for path in log_paths]
    spent = _privacy_ledgers(privacy_ledgers)
    report: dict[str, Any] = {"schema": SCHEMA, "generated": utc_now(), "verified": True, "ledgers": [], "runs": [],
                              "institutions": {}, "release_logs": [], "rounds_axis": [],
                              "privacy_ledgers": [{"institution": name, "path": str(path)} for name, path in spent]}
    for chain, label in zip(chains, labels, strict=True):
        companions = _companions(chain, logs, chains)
        check = verify_ledger(chain.path, coordinator_key=coordinator_key, allow_list=allow_list, client_logs=companions)
        report["verified"] = report["verified"] and check.ok
        report["ledgers"].append({
            "path": str(chain.path), "run": label, "ok": check.ok, "problems": [str(p) for p in check.problems],
            "notes": list(check.notes), "checked": dict(check.checked), "release_logs": [str(p) for p in companions],
        })
        report["runs"].append(_run_summary(chain, label, check.ok))
        _add_replies(report, chain, label, check.ok)
    for log in logs:
        _add_release_log(report, log, chains, labels)
    run_labels = {run_id: label for chain, label in zip(chains, labels, strict=True) for run_id in _run_ids(chain)}
    for name, path in spent:
        _institution(report, name)["privacy_ledger"] = privacy_ledger_summary(path, run_labels)
    for institution in report["institutions"].values():
        summarise_privacy(institution)
    report["institutions"] = dict(sorted(report["institutions"].items()))
    return report


def _privacy_ledgers(given: Iterable[tuple[str, Path | str]]) -> list[tuple[str, Path]]:
    pairs = [(str(name), Path(path)) for name, path in given]
    _existing((path for _, path in pairs), "privacy ledger")
    if twice := sorted({name for name, _ in pairs if [n for n, _ in pairs].count(name) > 1}):
        raise ConfigError(f"--privacy-ledger names {', '.join(twice)} more than once; an institution keeps one privacy "
                          "ledger for all its runs: pass that one")
    return pairs


def _existing(paths: Iterable[Path | str], what: str) -> list[Path]:
    found = [Path(p) for p in paths]
    if missing := [str(p) for p in found if not p.is_file()]:
        raise ConfigError(f"{what} {', '.join(missing)} not found; check the path (a run folder holds ledger.jsonl, "
                          f"an institution's sites folder its release-log.jsonl)")
    return found


def _run_labels(chains: list[Chain]) -> list[str]:
    """One unique name per ledger: its run name, or its folder's name, numbered when two share one."""
    labels: list[str] = []
    for chain in chains:
        bodies = _bodies(chain, kinds.RUN_STARTED) or _bodies(chain, OPENED)
        name = str((bodies[0] if bodies else {}).get("run_name") or chain.path.parent.name)
        labels.append(name if name not in labels else f"{name} ({len(labels) + 1})")
    return labels


def _bodies(chain: Chain, kind: str) -> list[dict[str, Any]]:
    return [entry["body"] for _, entry in chain.entries if entry["kind"] == kind]


def _run_ids(chain: Chain) -> set[str]:
    return {str(body.get("run_id")) for body in _bodies(chain, kinds.RUN_STARTED)}


def _companions(chain: Chain, logs: list[Chain], chains: list[Chain]) -> list[Path]:
    """The release logs of this ledger's run; a log of no given run goes to every ledger its institution is in."""
    run_ids, folder = _run_ids(chain), chain.path.parent.resolve()
    institutions = set(_node_institutions(chain).values())
    chosen = []
    for log in logs:
        log_ids = {str(body.get("run_id")) for body in _bodies(log, kinds.RELEASE)}
        orphan = not any(log_ids & _run_ids(other) for other in chains)
        if log_ids & run_ids or folder in log.path.resolve().parents or (orphan and _institution_of(log) in institutions):
            chosen.append(log.path)
    return chosen


def _institution_of(log: Chain) -> str | None:
    return log.genesis["body"].get("institution_id") if log.genesis else None


def _signed(body: dict[str, Any]) -> tuple[str, str] | None:
    """An entry's attestation as (statement, signature), or None."""
    value = body.get("attestation")
    if isinstance(value, dict) and isinstance(value.get("statement"), str) and isinstance(value.get("signature"), str):
        return value["statement"], value["signature"]
    return None


def _statement(body: dict[str, Any]) -> dict[str, Any]:
    """The attestation's statement as a dict, or {} when there is none or it does not parse."""
    signed = _signed(body)
    try:
        fields = json.loads(signed[0]) if signed else {}
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _opens_round(entry: dict[str, Any]) -> bool:
    """A round of the run opens: a soft-label query, or the FedAvg baseline's exchange of weights."""
    return bool(entry["kind"] == kinds.ROUND_OPENED or (
        entry["kind"] == kinds.EXCHANGE_OPENED and entry["body"].get("phase") == kinds.FEDAVG_PHASE))


def _release_phase(statement: dict[str, Any]) -> str:
    """The phase a logged release answered, from the payload its attestation states."""
    kind = _payload_kind(statement)
    return "digest" if kind == DIGEST_PAYLOAD else kinds.FEDAVG_PHASE if kind == kinds.FEDAVG_PAYLOAD else SOFT_LABELS


def _round(body: dict[str, Any]) -> int | None:
    value = body.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _node_institutions(chain: Chain) -> dict[str, str]:
    """Node id -> institution id, as the ledger knows it: checked by an attestation, or claimed (common.audit.naming)."""
    return {node: name for node, (name, _) in node_names(entry for _, entry in chain.entries).items()}


def _run_summary(chain: Chain, label: str, verified: bool) -> dict[str, Any]:
    started = _bodies(chain, kinds.RUN_STARTED)
    first = started[0] if started else {}
    closing = next((e for _, e in reversed(chain.entries) if e["kind"] in kinds.CLOSING), None)
    end = closing["body"] if closing else {}
    abandoned = abandoned_entries(entry for _, entry in chain.entries)
    kept = [entry for _, entry in chain.entries if entry["seq"] not in abandoned]
    checkpoints = [e["body"] for e in kept if e["kind"] == kinds.CHECKPOINT]
    aggregated = [e["body"] for e in kept if e["kind"] == kinds.AGGREGATED]
    config: dict[str, Any] = first["config"] if isinstance(first.get("config"), dict) else {}
    mechanisms = sorted({str((_statement(e["body"]).get("privacy") or {}).get("mechanism", "none"))
                         for e in kept if e["kind"] == kinds.REPLY_ACCEPTED and _signed(e["body"])})
    privacy = config.get("privacy") or next((m for m in mechanisms if m != "none"), mechanisms[0] if mechanisms else None)
    return {
        "run": label, "ledger": str(chain.path), "verified": verified, "run_name": first.get("run_name"),
        "run_ids": sorted({str(body.get("run_id")) for body in started}), "scenario": first.get("scenario"),
        "method": first.get("method"), "aggregation": first.get("aggregation"), "num_server_rounds": first.get("num_server_rounds"),
        "rounds_opened": sum(_opens_round(e) for e in kept), "rounds_aggregated": len(aggregated),
        "digests_opened": len(_bodies(chain, kinds.DIGEST_OPENED)),
        "rounds": end.get("rounds", len(aggregated)),
        "status": end.get("status", "unfinished"), "error": end.get("error"), "restarts": len(_bodies(chain, RESUMED)),
        "resumes": [{"run_id": b.get("run_id"), "after_round": b.get("checkpoint_round"), "abandoned_rounds": b.get("abandoned_rounds"),
                     "interrupted_run_ids": b.get("interrupted_run_ids")} for b in _bodies(chain, kinds.RUN_RESUMED)],
        "started": next((e["time"] for _, e in chain.entries if e["kind"] == kinds.RUN_STARTED), None),
        "ended": closing["time"] if closing else None,
        "student_sha256": end.get("student_sha256") or (checkpoints[-1].get("sha256") if checkpoints else None),
        "student_accuracy": checkpoints[-1].get("student_accuracy") if checkpoints else None,
        "institutions": sorted(set(_node_institutions(chain).values())),
        "privacy": privacy, "guarantee": guarantee_of(privacy) if privacy else None,
        "secure_aggregation": config.get("secure-aggregation"), "cosignatures": len(_bodies(chain, COSIGNED)),
    }


def _institution(report: dict[str, Any], name: str) -> dict[str, Any]:
    institutions: dict[str, dict[str, Any]] = report["institutions"]
    return institutions.setdefault(name, {
        "runs": [], "rounds": {}, "releases_accepted": 0, "releases_rejected": 0, "releases_only_logged": 0, "bytes_accepted": 0,
        "bytes_sent": 0, "data_categories": [], "privacy_mechanisms": [], "privacy": [], "per_round": [],
        "rejections": [], "refusals": 0, "first_release": None, "last_release": None, "unverified_runs": [], "release_logs": [],
        "privacy_ledger": None, "witnessed": {"cosignatures": 0, "largest_size": None, "runs": {}},
    })


def _add_replies(report: dict[str, Any], chain: Chain, label: str, verified: bool) -> None:
    """Every reply the ledger records, under the institution that made it (or `node N (unidentified)`), and every
    cosignature of a signed tree head under the institution that witnessed it."""
    nodes = node_names(entry for _, entry in chain.entries)
    for _, entry in chain.entries:
        body = entry["body"]
        if _opens_round(entry) and [label, _round(body)] not in report["rounds_axis"]:
            report["rounds_axis"].append([label, _round(body)])
        if entry["kind"] == COSIGNED and isinstance(body.get("institution_id"), str):
            _add_cosignature(_institution(report, body["institution_id"]), label, body.get("size"))
        if entry["kind"] not in REPLIES or body.get("phase") == kinds.WITNESS_PHASE:
            continue  # a cosignature of the final tree head releases no data: counted with the witnessed checkpoints
        statement, node = _statement(body), str(body.get("node_id"))
        known, source = nodes.get(node, (None, None))
        own = body.get("institution_id") or statement.get("institution_id")
        accepted, round_ = entry["kind"] == kinds.REPLY_ACCEPTED, _round(body)
        name = own or known  # what this reply signed (checked when accepted, claimed when not), else what the ledger knows
        named_by = (ATTESTATION if accepted and own else source if name == known else CLAIM) if name else None
        institution = _institution(report, str(name or f"node {node} (unidentified)"))
        phase = str(body.get("phase") or SOFT_LABELS)
        _add_new(institution["runs"], label)
        _add_new(institution["rounds"].setdefault(label, []), round_)
        if not verified:
            _add_new(institution["unverified_runs"], label)
        size = int(_number(body.get("payload_bytes") if accepted else statement.get("payload_bytes")))
        institution["releases_accepted" if accepted else "releases_rejected"] += 1
        institution["bytes_accepted"] += size if accepted else 0
        if not accepted:
            refusal = body.get("check") in REFUSAL_CHECKS
            institution["refusals"] += refusal
            institution["rejections"].append({"run": label, "round": round_, "phase": phase, "node_id": body.get("node_id"),
                                              "check": body.get("check"), "reason": body.get("reason"), "time": entry["time"],
                                              "attested": bool(statement), "refusal": refusal, "institution_from": named_by})
        _add_release(institution, label, round_, size, statement, "accepted" if accepted else "rejected", phase)


def _add_release(
    institution: dict[str, Any], label: str, round_: int | None, size: int, statement: dict[str, Any], outcome: str, phase: str,
) -> None:
    """Bytes, data categories and privacy of one release; `outcome` is accepted, rejected, late or not in the ledger."""
    institution["bytes_sent"] += size
    institution["per_round"].append({"run": label, "round": round_, "phase": phase, "outcome": outcome, "bytes": size})
    if not statement:
        return  # nothing signed: the ledger cannot say what, if anything, left the institution
    for category in _list(statement.get("data_categories")):
        _add_new(institution["data_categories"], str(category))
    privacy = statement.get("privacy")
    if not isinstance(privacy, dict):
        privacy = {}
    mechanism, time = str(privacy.get("mechanism", "none")), str(statement.get("time", ""))
    guarantee = guarantee_of(mechanism)
    _add_new(institution["privacy_mechanisms"], mechanism)
    figures = {key: _number(privacy.get(key)) if guarantee != "none" else None for key in ("epsilon", "epsilon_total", "delta")}
    institution["privacy"].append({  # no mechanism: no epsilon at all (null), never 0
        "run": label, "round": round_, "phase": phase, "time": time, "outcome": outcome, "mechanism": mechanism,
        "guarantee": guarantee, **figures,
    })
    institution["first_release"] = min(filter(None, (institution["first_release"], time)), default=None)
    institution["last_release"] = max(filter(None, (institution["last_release"], time)), default=None)


def _add_new(items: list[Any], item: Any) -> None:
    if item not in items:
        items.append(item)


def _payload_kind(statement: dict[str, Any]) -> Any:
    return statement["payload"].get("kind") if isinstance(statement.get("payload"), dict) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _add_cosignature(institution: dict[str, Any], label: str, size: Any) -> None:
    """One witnessed checkpoint: the institution cosigned the ledger's signed tree head of `size` entries."""
    witnessed = institution["witnessed"]
    witnessed["cosignatures"] += 1
    witnessed["runs"][label] = witnessed["runs"].get(label, 0) + 1
    if isinstance(size, int) and not isinstance(size, bool):
        witnessed["largest_size"] = max(size, witnessed["largest_size"] or 0)


def _add_release_log(report: dict[str, Any], log: Chain, chains: list[Chain], labels: list[str]) -> None:
    """Which releases of an institution's log the ledgers record: accepted, rejected, late (timed out) or missing.

    Late, abandoned (made for a round the coordinator abandoned when it stopped, before a resume) and missing
    releases left the institution all the same: their bytes and privacy count too.
    """
    where: dict[tuple[str, str], str] = {}  # (statement, signature) -> the kind of the ledger entry that holds it
    runs: dict[str, str] = {}  # run id -> ledger label
    timeouts: set[tuple[str, int | None, str]] = set()  # (ledger label, round, node id)
    abandoned: dict[str, int] = {}
    for chain, chain_label in zip(chains, labels, strict=True):
        runs.update({run_id: chain_label for run_id in _run_ids(chain)})
        abandoned.update(abandoned_releases(chain))
        for _, entry in chain.entries:
            if (signed := _signed(entry["body"])) is not None:
                where[signed] = entry["kind"]
            if entry["kind"] == kinds.REPLY_REJECTED and entry["body"].get("check") == "timeout":
                timeouts.add((chain_label, _round(entry["body"]), str(entry["body"].get("node_id"))))
    name, path = _institution_of(log), str(log.path)
    counts, missing = {"releases": 0, "accepted": 0, "rejected": 0, "late": 0, "abandoned": 0, "other_runs": 0}, []
    for body in _bodies(log, kinds.RELEASE):
        counts["releases"] += 1
        signed = _signed(body)
        kind, label, round_ = where.get(signed) if signed else None, runs.get(str(body.get("run_id"))), _round(body)
        if label is None or kind is not None:
            counts["other_runs" if label is None else "accepted" if kind == kinds.REPLY_ACCEPTED else "rejected"] += 1
            continue
        late = (label, round_, str(body.get("node_id"))) in timeouts
        after = abandoned.get(str(body.get("run_id")))
        dropped = not late and after is not None and round_ is not None and round_ > after  # the coordinator stopped
        counts["late"] += late
        counts["abandoned"] += dropped
        missing += [] if late or dropped else [{"run": label, "round": round_}]
        statement = _statement(body)
        if owner := name or statement.get("institution_id"):
            _institution(report, str(owner))["releases_only_logged"] += 1
            _add_release(_institution(report, str(owner)), label, round_, int(_number(statement.get("payload_bytes"))), statement,
                         "late" if late else "abandoned" if dropped else "not in the ledger", _release_phase(statement))
    checked = [ledger["run"] for ledger in report["ledgers"] if path in ledger["release_logs"]]
    report["release_logs"].append({"path": path, "institution": name, **counts, "missing": missing, "all_in_ledger": not missing,
                                   "checked_against": checked})
    if name:
        _institution(report, name)["release_logs"].append(path)
