"""A soft-label round under secure aggregation: four exchanges, and the server only ever opens the sum.

keys -> roster -> sealed share bundles (relayed) -> masked soft labels -> unmasking shares -> sum.
Each exchange checks every reply's attestation first, then its schema, and records it in the ledger.
See common/secagg/protocol.py for the protocol and what each party learns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.audit.attestation import Attestation
from common.config import RunConfig
from common.errors import AuditError, FedstillError, QuorumError
from common.messages import (
    SETUP_TYPE, SHARES_TYPE, SOFT_LABELS_TYPE, UNMASK_TYPE, MaskedReply, SecAggBundles, SecAggKeys, SecAggRoster,
    SecAggSetup, SecAggShares, SecAggUnmask, SoftLabelQuery, read_attestation, record_digest, record_nbytes,
)
from common.secagg.masking import dequantise
from common.secagg.protocol import make_roster, server_sum
from server.audit_trail import AuditTrail
from server.rounds import _node_error, node_error_check, send_and_receive

WARNING = 30


@dataclass
class Exchange:
    """One exchange's replies: parsed when valid, else the reason and the failed check; bytes both ways."""

    accepted: dict[int, Any] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    checks: dict[int, str] = field(default_factory=dict)
    attestations: dict[int, Attestation | None] = field(default_factory=dict)
    payload_digests: dict[int, tuple[str, int]] = field(default_factory=dict)
    uplink_bytes: dict[int, int] = field(default_factory=dict)
    downlink_bytes: int = 0


def exchange(
    grid: Grid, records: dict[int, RecordDict], message_type: str, round_: int, timeout: float,
    parse: Callable[[RecordDict], Any], check: Callable[[int, RecordDict], Attestation | None],
) -> Exchange:
    """Send each node its record and judge the answers: attestation first (`check`), then `parse`."""
    messages = [Message(content=record, dst_node_id=node, message_type=message_type, group_id=f"{round_}-{message_type}")
                for node, record in records.items()]
    result = Exchange(downlink_bytes=sum(record_nbytes(record) for record in records.values()))
    for node, reply in send_and_receive(grid, messages, timeout):
        if reply.has_error():
            result.rejected[node], result.checks[node] = _node_error(reply.error.reason), node_error_check(reply.error.reason)
            continue
        content = reply.content
        result.uplink_bytes[node] = record_nbytes(content)
        try:
            result.payload_digests[node] = record_digest(content)
            result.attestations[node] = _claimed(content)
            result.attestations[node] = check(node, content)
            result.accepted[node] = parse(content)
        except AuditError as problem:
            result.rejected[node], result.checks[node] = f"{type(problem).__name__}: {problem}", problem.check
        except Exception as problem:  # noqa: BLE001 - no reply, however malformed, may crash the server
            result.rejected[node], result.checks[node] = f"{type(problem).__name__}: {problem}", "format"
    for node in set(records) - set(result.accepted) - set(result.rejected):
        result.rejected[node], result.checks[node] = f"no reply within round-timeout={timeout:g} s", "timeout"
    for node, reason in sorted(result.rejected.items()):
        log(WARNING, "round %d %s: dropped node %d: %s", round_, message_type, node, reason)
    return result


def secure_soft_labels(
    grid: Grid, cfg: RunConfig, trail: AuditTrail, query: SoftLabelQuery, nodes: list[int]
) -> tuple[np.ndarray, Exchange]:
    """Run the four exchanges; return the aggregate (m, C) — the mean, or the num-examples weighted mean —
    and the masked-answer exchange, with rejections and bytes of all four phases."""
    round_, timeout = query.round, cfg.round_timeout
    attested = partial(trail.check_exchange, round_, query.fingerprint)
    phases: list[Exchange] = []

    def run(phase: str, records: dict[int, RecordDict], message_type: str, parse: Callable, check: Callable = attested) -> Exchange:
        if phase == "soft-labels":
            trail.round_opened(query, next(iter(records.values())), sorted(records))
        else:
            trail.exchange_opened(phase, round_, records)
        outcome = exchange(grid, records, message_type, round_, timeout, parse, check)
        trail.record_replies(round_, outcome, phase=phase)
        phases.append(outcome)
        return outcome

    keys = run("secagg-keys", {n: SecAggSetup(round_).to_record() for n in nodes}, SETUP_TYPE,
               lambda c: SecAggKeys.from_record(c, round_))
    _drop_shared_keys(keys)
    roster = make_roster({n: (k.mask_key, k.share_key) for n, k in keys.accepted.items()})
    threshold = cfg.secagg_threshold or max(2, len(roster) // 2 + 1)
    _require(len(roster), threshold, cfg, round_, "sent keys")
    request = SecAggRoster(round_, threshold, cfg.aggregation == "weighted", roster)
    bundles = run("secagg-bundles", {n: request.to_record() for n in roster}, SHARES_TYPE,
                  lambda c: SecAggBundles.from_record(c, round_, roster))
    shared = SecAggRoster(round_, threshold, cfg.aggregation == "weighted", {n: roster[n] for n in bundles.accepted})
    _require(len(shared.roster), threshold, cfg, round_, "distributed their shares")

    length = len(query.sample_ids) * query.num_classes + 1
    masked = run("soft-labels", {n: _merge(query.to_record(), shared.to_record()) for n in shared.roster}, SOFT_LABELS_TYPE,
                 lambda c: MaskedReply.from_record(c, round_, query.fingerprint, length), partial(trail.check_reply, query))
    survivors = sorted(masked.accepted)
    _require(len(survivors), threshold, cfg, round_, "sent masked soft labels")
    dropped = sorted(set(shared.roster) - set(survivors))
    unmask = {n: _merge(SecAggUnmask(round_, survivors, dropped,
                                     {s: bundles.accepted[s].bundles[n] for s in shared.roster}).to_record(), shared.to_record())
              for n in survivors}
    shares = run("secagg-shares", unmask, UNMASK_TYPE, lambda c: SecAggShares.from_record(c, round_))
    _require(len(shares.accepted), threshold, cfg, round_, "returned shares")

    try:
        total = server_sum({n: masked.accepted[n].masked for n in survivors}, {n: s.shares for n, s in shares.accepted.items()},
                           shared.roster, threshold, f"fedstill/{trail.run_id}/{round_}".encode())
    except FedstillError as error:
        raise QuorumError(f"round {round_}: secure aggregation could not open the sum: {error}") from None
    return _mean(dequantise(total), len(query.sample_ids), query.num_classes), _combined(masked, phases)


def _drop_shared_keys(keys: Exchange) -> None:
    """Nodes that sent a key another node also sent cannot take part (their masks would not be theirs alone)."""
    seen: dict[bytes, list[int]] = {}
    for node, k in keys.accepted.items():
        for key in (k.mask_key, k.share_key):
            seen.setdefault(key, []).append(node)
    for node in sorted({n for nodes in seen.values() if len(nodes) > 1 for n in nodes}):
        del keys.accepted[node]
        keys.rejected[node], keys.checks[node] = "AuditError: secure aggregation: a public key this node sent was also sent by another node", "secagg"


def _mean(values: np.ndarray, rows: int, classes: int) -> np.ndarray:
    """sum(w * p) / sum(w), rows put back on the simplex (fixed-point rounding is below 1e-6)."""
    weight = values[-1]
    if not weight > 0:
        raise QuorumError(f"secure aggregation: the summed weight is {weight}, expected > 0")
    probs = np.clip(values[:-1].reshape(rows, classes) / weight, 0.0, None)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def _combined(masked: Exchange, phases: list[Exchange]) -> Exchange:
    """The masked-answer exchange, carrying every phase's rejections and bytes (for results.json)."""
    result = Exchange(accepted=masked.accepted, attestations=masked.attestations)
    for phase in phases:
        result.downlink_bytes += phase.downlink_bytes
        for node, size in phase.uplink_bytes.items():
            result.uplink_bytes[node] = result.uplink_bytes.get(node, 0) + size
        for node, reason in phase.rejected.items():
            result.rejected.setdefault(node, reason)
            result.checks.setdefault(node, phase.checks.get(node, "format"))
    return result


MIN_PARTIES = 3  # with two, each learns the other's soft labels from the sum


def _require(count: int, threshold: int, cfg: RunConfig, round_: int, what: str) -> None:
    need = max(threshold, cfg.min_clients, MIN_PARTIES)
    if count < need:
        raise QuorumError(f"round {round_}: only {count} institutions {what}; secure aggregation needs "
                          f"{need} (threshold {threshold}, min-clients {cfg.min_clients}, and never fewer than {MIN_PARTIES})")


def _merge(first: RecordDict, second: RecordDict) -> RecordDict:
    for key, value in second.items():
        first[key] = value
    return first


def _claimed(content: RecordDict) -> Attestation | None:
    try:
        return read_attestation(content)
    except FedstillError:
        return None
