"""A soft-label round under secure aggregation: four exchanges, and the server only ever opens the sum.

keys -> roster -> sealed share bundles (relayed) -> masked soft labels -> unmasking shares -> sum.
Each exchange goes through server/exchange.py (attestation first, then schema) and is recorded in the ledger.
See common/secagg/protocol.py for the protocol and what each party learns.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import FedstillError, QuorumError
from common.messages import (
    SETUP_TYPE,
    SHARES_TYPE,
    SOFT_LABELS_TYPE,
    UNMASK_TYPE,
    MaskedReply,
    SecAggBundles,
    SecAggKeys,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    SoftLabelQuery,
)
from common.secagg.masking import dequantise
from common.secagg.protocol import make_roster, server_sum
from server.audit_trail import AuditTrail
from server.exchange import Check, Exchange, Phase, ask, exchange

R = TypeVar("R")


def secure_phase(name: str) -> Phase:
    """A secure-aggregation exchange: a reply that breaks its parser is dropped with the error alone."""
    return Phase(name, unreadable="{error}")


def secure_soft_labels(
    grid: Grid, cfg: RunConfig, trail: AuditTrail, query: SoftLabelQuery, nodes: list[int]
) -> tuple[np.ndarray, Exchange[MaskedReply]]:
    """Run the four exchanges; return the aggregate (m, C) — the mean, or the num-examples weighted mean —
    and the masked-answer exchange, with rejections and bytes of all four phases."""
    round_, timeout = query.round, cfg.round_timeout
    attested = partial(trail.check_exchange, round_, query.fingerprint)
    phases: list[Exchange[Any]] = []

    def run(name: str, records: dict[int, RecordDict], message_type: str, parse: Callable[[RecordDict], R],
            check: Check = attested) -> Exchange[R]:
        if name == "soft-labels":
            trail.round_opened(query, next(iter(records.values())), sorted(records))
        else:
            trail.exchange_opened(name, round_, records)
        outcome = exchange(grid, ask(records, message_type, f"{round_}-{message_type}"), timeout, parse, check,
                           secure_phase(name), round_)
        trail.record_replies(round_, outcome, phase=name)
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
    values = dequantise(total)
    problem = sum_out_of_range(values, len(query.sample_ids), query.num_classes, len(survivors),
                               cfg.aggregation == "weighted", trail.weight_caps(survivors))
    if problem:
        trail.sum_refused(round_, "weight-range", problem)
        raise QuorumError(f"round {round_}: secure aggregation refused the opened sum: {problem}")
    return _mean(values, len(query.sample_ids), query.num_classes), _combined(masked, phases)


def sum_out_of_range(values: np.ndarray, rows: int, classes: int, parties: int, weighted: bool,
                     caps: list[float] | None) -> str:
    """Why the opened sum [sum w*p (rows*classes), sum w] cannot come from `parties` honest institutions ("" if it can).

    Each honest institution adds a weight w with 1 <= w <= its agreed max-examples (w = 1 under `mean`) and
    w times rows on the simplex: so the total weight W lies in [parties, sum of caps] (exactly `parties` under
    `mean`), every entry of the summed rows in [0, W], and every summed row adds up to W. Each institution's own
    weight stays hidden; a lie that keeps these totals in range is not detected (see docs/methods.md).
    """
    weight, sums = float(values[-1]), values[:-1].reshape(rows, classes)
    tolerance = 1e-3 * max(abs(weight), 1.0) + parties * classes * 2.0**-20  # float32 rows and fixed-point rounding
    upper = float(sum(caps)) if weighted and caps else (np.inf if weighted else float(parties))
    if not (parties - tolerance <= weight <= upper + tolerance):
        bound = f"exactly {parties} (one per institution)" if not weighted else f"in [{parties}, {upper:g}]"
        return f"the summed weight is {weight:g}, expected {bound}: an institution sent a weight out of range"
    if (sums < -tolerance).any() or (sums > weight + tolerance).any() or (np.abs(sums.sum(axis=1) - weight) > tolerance).any():
        return "the summed soft labels are not rows on the simplex scaled by the summed weight: an institution sent values out of range"
    return ""


def _drop_shared_keys(keys: Exchange[SecAggKeys]) -> None:
    """Nodes that sent a key another node also sent cannot take part (their masks would not be theirs alone)."""
    seen: dict[bytes, list[int]] = {}
    for node, k in keys.accepted.items():
        for key in (k.mask_key, k.share_key):
            seen.setdefault(key, []).append(node)
    for node in sorted({n for nodes in seen.values() if len(nodes) > 1 for n in nodes}):
        del keys.accepted[node]
        keys.reject(node, "AuditError: secure aggregation: a public key this node sent was also sent by another node", "secagg")


def _mean(values: np.ndarray, rows: int, classes: int) -> np.ndarray:
    """sum(w * p) / sum(w), rows put back on the simplex (fixed-point rounding is below 1e-6)."""
    weight = values[-1]
    if not weight > 0:
        raise QuorumError(f"secure aggregation: the summed weight is {weight}, expected > 0")
    probs = np.clip(values[:-1].reshape(rows, classes) / weight, 0.0, None)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def _combined(masked: Exchange[MaskedReply], phases: list[Exchange[Any]]) -> Exchange[MaskedReply]:
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

