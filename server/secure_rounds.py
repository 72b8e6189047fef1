"""A soft-label round under secure aggregation: six exchanges, and the server only ever opens the sum.

signed keys -> roster -> signed share bundles (relayed) -> inbox (disputes settled) -> masked soft labels ->
survivor set signed -> unmasking shares -> sum, each rebuilt secret checked against its commitment or public key.
Each exchange goes through server/exchange.py (attestation first, then schema), then through the protocol's own
checks (server/secure_checks.py), and is recorded in the ledger; a faulty peer is dropped and named, and the round
goes on while a threshold of institutions remains. See common/secagg/protocol.py for what each party learns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import ConfigError, FedstillError, QuorumError
from common.messages import (
    CONSISTENCY_TYPE,
    INBOX_TYPE,
    SETUP_TYPE,
    SHARES_TYPE,
    SOFT_LABELS_TYPE,
    UNMASK_TYPE,
    MaskedReply,
    SecAggBundles,
    SecAggComplaints,
    SecAggConsistency,
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggSignature,
    SecAggUnmask,
    SoftLabelQuery,
)
from common.secagg.masking import dequantise
from common.secagg.protocol import MIN_PARTIES, Roster, majority_threshold, make_roster, server_sum
from server.audit_trail import AuditTrail
from server.exchange import Check, Exchange, Phase, ask, exchange
from server.secure_checks import (
    dispute_reason,
    expected_shares,
    refuse_bad_keys,
    refuse_bad_signatures,
    refuse_unsigned_bundles,
    settle_disputes,
)

R = TypeVar("R")


def secure_phase(name: str) -> Phase:
    """A secure-aggregation exchange: a reply that breaks its parser is dropped with the error alone."""
    return Phase(name, unreadable="{error}")


def check_secure_run(cfg: RunConfig) -> None:
    """Before anything is written: a secure-aggregation run needs the allow-list, against which the coordinator checks
    every institution's signed round keys, bundles and survivor signatures to drop a faulty peer (the run config is
    checked earlier too, before `fedstill simulate` provisions the allow-list, so this check is the server's)."""
    if cfg.secure_aggregation and not cfg.allow_list:
        raise ConfigError("secure aggregation needs allow-list: every institution signs its round keys, bundles and "
                          "survivor sets, and the coordinator checks them against the allow-list of institution keys to "
                          "drop a faulty peer; set allow-list (fedstill simulate provisions one)")


def secure_soft_labels(
    grid: Grid, cfg: RunConfig, trail: AuditTrail, query: SoftLabelQuery, nodes: list[int]
) -> tuple[np.ndarray, Exchange[MaskedReply]]:
    """Run the six exchanges; return the aggregate (m, C) — the mean, or the num-examples weighted mean — and the
    masked-answer exchange, with rejections, drops and bytes of all six phases."""
    step = SecureRound(grid, cfg, trail, query)
    roster = step.keys(nodes)
    threshold = cfg.secagg_threshold or majority_threshold(len(roster))
    step.require(len(roster), threshold, "sent keys")
    bundles = step.bundles(roster, threshold)
    shared = step.inbox(roster, bundles, threshold)
    masked = step.masked(SecAggRoster(query.round, threshold, step.weighted, {n: roster[n] for n in shared}))
    survivors = sorted(masked.accepted)
    step.require(len(survivors), threshold, "sent masked soft labels")
    signatures = step.consistency(roster, shared, survivors, threshold)
    shares = step.run("secagg-shares", {n: SecAggUnmask(query.round, survivors, signatures).to_record() for n in signatures},
                      UNMASK_TYPE, lambda c: expected_shares(SecAggShares.from_record(c, query.round), shared, survivors))
    step.require(len(shares.accepted), threshold, "returned shares")
    values = step.open_sum({n: masked.accepted[n].masked for n in survivors}, shares, {n: roster[n] for n in shared},
                           threshold, {n: bundles.accepted[n].commitment for n in shared})
    return checked_mean(trail, query, values, survivors, step.weighted), step.combined(masked)


@dataclass
class SecureRound:
    """One secure-aggregation round's exchanges, each through the one exchange path and into the ledger."""

    grid: Grid
    cfg: RunConfig
    trail: AuditTrail
    query: SoftLabelQuery
    phases: list[Exchange[Any]] = field(default_factory=list)
    dropped: dict[int, tuple[str, str]] = field(default_factory=dict)  # node -> (reason, check), outside its own replies

    @property
    def weighted(self) -> bool:
        return self.cfg.aggregation == "weighted"

    @property
    def run_id(self) -> int:
        return int(self.trail.run_id)

    @property
    def allow_list(self) -> dict[str, str]:
        return self.trail.allow_list or {}

    def run(self, name: str, records: dict[int, RecordDict], message_type: str, parse: Callable[[RecordDict], R],
            settle: Callable[[Exchange[R]], None] | None = None) -> Exchange[R]:
        """Send one step, judge the replies (attestation, schema, then `settle`: the protocol's own checks), record."""
        round_ = self.query.round
        check: Check
        if name == "soft-labels":
            self.trail.round_opened(self.query, next(iter(records.values())), sorted(records))
            check = partial(self.trail.check_reply, self.query)
        else:
            self.trail.exchange_opened(name, round_, records)
            check = partial(self.trail.check_exchange, round_, self.query.fingerprint)
        outcome = exchange(self.grid, ask(records, message_type, f"{round_}-{message_type}"), self.cfg.round_timeout,
                           parse, check, secure_phase(name), round_, self.trail.witnessing)
        if settle is not None:
            settle(outcome)
        self.trail.record_replies(round_, outcome, phase=name)
        self.phases.append(outcome)
        return outcome

    def keys(self, nodes: list[int]) -> Roster:
        """Step 1: every node's signed round keys; invalid or unsigned ones are refused; the roster of the rest."""
        round_ = self.query.round
        keys = self.run("secagg-keys", {n: SecAggSetup(round_).to_record() for n in nodes}, SETUP_TYPE,
                        lambda c: SecAggKeys.from_record(c, round_),
                        lambda k: refuse_bad_keys(k, self.allow_list, self.trail.bindings, self.run_id, round_))
        return make_roster({n: (k.mask_key, k.share_key) for n, k in keys.accepted.items()},
                           {n: (k.institution, k.signature) for n, k in keys.accepted.items()})

    def bundles(self, roster: Roster, threshold: int) -> Exchange[SecAggBundles]:
        """Step 2: the roster and threshold out; every member's signed bundles (and seed commitment) back."""
        round_ = self.query.round
        request = SecAggRoster(round_, threshold, self.weighted, roster)
        bundles = self.run("secagg-bundles", {n: request.to_record() for n in roster}, SHARES_TYPE,
                           lambda c: SecAggBundles.from_record(c, round_, roster),
                           lambda b: refuse_unsigned_bundles(b, roster, self.allow_list, self.run_id, round_))
        self.require(len(bundles.accepted), threshold, "distributed their shares")
        return bundles

    def inbox(self, roster: Roster, bundles: Exchange[SecAggBundles], threshold: int) -> list[int]:
        """Step 3: each sender's bundles to their addressees; the complaints settled. Returns U: the members that
        opened every other member's bundles, and whose bundles every other member opened."""
        round_, sources = self.query.round, sorted(bundles.accepted)
        inboxes = {n: SecAggInbox(round_, {s: bundles.accepted[s].bundles[n] for s in sources},
                                  {s: bundles.accepted[s].signatures[n] for s in sources}).to_record() for n in sources}
        checked = self.run("secagg-inbox", inboxes, INBOX_TYPE, lambda c: SecAggComplaints.from_record(c, round_, sources))
        complaints = {n: reply.accused for n, reply in checked.accepted.items() if reply.accused}
        for node in settle_disputes(complaints):
            self.drop(node, "secagg-inbox", dispute_reason(node, complaints), "secagg-dispute")
        shared = sorted(set(checked.accepted) - set(self.dropped))
        self.require(len(shared), threshold, "opened every other's shares")
        return shared

    def masked(self, shared: SecAggRoster) -> Exchange[MaskedReply]:
        """Step 4: the query, with U beside it, to every member of U; their masked soft labels back."""
        cells = len(self.query.sample_ids) * self.query.num_classes
        query, length = self.query, cells + 1 + (cells if shared.weighted else 0)  # weighted: the plain rows too
        records = {n: _merge(query.to_record(), shared.to_record()) for n in shared.roster}
        return self.run("soft-labels", records, SOFT_LABELS_TYPE,
                        lambda c: MaskedReply.from_record(c, query.round, query.fingerprint, length))

    def consistency(self, roster: Roster, shared: list[int], survivors: list[int], threshold: int) -> dict[int, str]:
        """Step 5: the survivor set S to every survivor; their signatures of (U, S), each checked."""
        round_ = self.query.round
        signed = self.run("secagg-consistency", {n: SecAggConsistency(round_, survivors).to_record() for n in survivors},
                          CONSISTENCY_TYPE, lambda c: SecAggSignature.from_record(c, round_),
                          lambda s: refuse_bad_signatures(s, roster, self.allow_list, self.run_id, round_, shared, survivors))
        self.require(len(signed.accepted), threshold, "signed the survivor set")
        return {n: reply.signature for n, reply in sorted(signed.accepted.items())}

    def open_sum(self, masked: dict[int, np.ndarray], shares: Exchange[SecAggShares], shared: Roster, threshold: int,
                 commitments: dict[int, bytes]) -> np.ndarray:
        """Step 6, the server's part: rebuild and check the secrets, remove the masks, open the sum (float64); name
        each node whose shares were off their polynomial."""
        round_ = self.query.round
        try:
            opened = server_sum(masked, {n: s.shares for n, s in shares.accepted.items()}, shared, threshold,
                                f"fedstill/{self.trail.run_id}/{round_}".encode(), commitments)
        except FedstillError as error:
            raise QuorumError(f"round {round_}: secure aggregation could not open the sum: {error}") from None
        for node, sources in sorted(opened.altered.items()):
            self.drop(node, "secagg-shares", f"secure aggregation: the shares it returned for nodes {sorted(sources)} are "
                                             "not on their polynomials (the other shares rebuilt the committed secrets)",
                      "secagg-share")
        return dequantise(opened.total)

    def drop(self, node: int, phase: str, reason: str, check: str) -> None:
        """A node dropped for what a step showed of it beyond its own reply: recorded, and named in the results."""
        self.dropped[node] = reason, check
        self.trail.secagg_dropped(self.query.round, phase, node, check, reason)

    def require(self, count: int, threshold: int, what: str) -> None:
        need = max(threshold, self.cfg.min_clients, MIN_PARTIES)
        if count < need:
            raise QuorumError(f"round {self.query.round}: only {count} institutions {what}; secure aggregation needs "
                              f"{need} (threshold {threshold}, min-clients {self.cfg.min_clients}, and never fewer than "
                              f"{MIN_PARTIES})")

    def combined(self, masked: Exchange[MaskedReply]) -> Exchange[MaskedReply]:
        """The masked-answer exchange, carrying every phase's rejections, the drops and the bytes (for results.json)."""
        result = Exchange(accepted=masked.accepted, attestations=masked.attestations)
        for phase in self.phases:
            result.downlink_bytes += phase.downlink_bytes
            for node, size in phase.uplink_bytes.items():
                result.uplink_bytes[node] = result.uplink_bytes.get(node, 0) + size
            for node, reason in phase.rejected.items():
                result.rejected.setdefault(node, reason)
                result.checks.setdefault(node, phase.checks.get(node, "format"))
        for node, (reason, check) in self.dropped.items():
            result.rejected.setdefault(node, reason)
            result.checks.setdefault(node, check)
        return result


def checked_mean(trail: AuditTrail, query: SoftLabelQuery, values: np.ndarray, survivors: list[int],
                 weighted: bool) -> np.ndarray:
    """The aggregate of an opened sum, range-checked (`sum_out_of_range`). Under a weighted rule the sum also holds
    the unweighted rows: a weighted sum out of range is refused in the ledger (`sum-refused`) and the round goes on
    with the plain mean, which no declared weight can tilt; a plain sum out of range stops the round."""
    rows, classes, parties = len(query.sample_ids), query.num_classes, len(survivors)
    cells = rows * classes
    if weighted:
        problem = sum_out_of_range(values[:cells + 1], rows, classes, parties, True, trail.weight_caps(survivors))
        if not problem:
            return _mean(values[:cells + 1], rows, classes)
        trail.sum_refused(query.round, "weight-range", f"{problem}; the round uses the unweighted sum instead")
        values = np.concatenate([values[cells + 1:], [float(parties)]])
    problem = sum_out_of_range(values, rows, classes, parties, False, None)
    if problem:
        trail.sum_refused(query.round, "value-range", problem)
        raise QuorumError(f"round {query.round}: secure aggregation refused the opened sum: {problem}")
    return _mean(values, rows, classes)


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


def _mean(values: np.ndarray, rows: int, classes: int) -> np.ndarray:
    """sum(w * p) / sum(w), rows put back on the simplex (fixed-point rounding is below 1e-6)."""
    weight = values[-1]
    if not weight > 0:
        raise QuorumError(f"secure aggregation: the summed weight is {weight}, expected > 0")
    probs = np.clip(values[:-1].reshape(rows, classes) / weight, 0.0, None)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def _merge(first: RecordDict, second: RecordDict) -> RecordDict:
    for key, value in second.items():
        first[key] = value
    return first
