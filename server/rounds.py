"""One round with the institutions: wait for nodes, query them for soft labels, send the FedMD consensus down.

Both exchanges go through server/exchange.py (push, pull as they arrive, judge) and are recorded in the audit trail;
the soft-label round folds each accepted reply into the round's running aggregate as it is judged (`folding`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from logging import INFO
from typing import Any, TypeAlias

import numpy as np
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.aggregation import NEEDS_CLASS_COUNTS, RunningAggregate
from common.audit import kinds
from common.config import RunConfig, temperature_at
from common.errors import QuorumError
from common.messages import (
    DIGEST_TYPE,
    SOFT_LABELS_TYPE,
    WITNESS_TYPE,
    DigestInstruction,
    DigestReply,
    MaskedReply,
    SoftLabelQuery,
    SoftLabelReply,
    WitnessCall,
    read_cosignature,
)
from server.audit_trail import AuditTrail
from server.exchange import Check, Exchange, Fold, Phase, ask, exchange
from server.witness import Witnessing

WAIT_POLL_S = 1.0
SOFT_LABELS = Phase("soft-labels")
DIGEST = Phase("digest", malformed="unreadable digest reply ({error})", unreadable="unreadable digest reply ({error})",
               silent="no digest reply within round-timeout={timeout:g} s", counts_uplink=False)
SoftLabels: TypeAlias = Exchange[SoftLabelReply] | Exchange[MaskedReply]  # a round's answers, plain or masked


def wait_for_nodes(grid: Grid, cfg: RunConfig) -> list[int]:
    """Wait until `num-clients` nodes are connected, or `node-wait-timeout` s; need `min-clients`."""
    deadline = time.monotonic() + cfg.node_wait_timeout
    nodes = list(grid.get_node_ids())
    if len(nodes) < cfg.num_clients:
        log(INFO, "waiting up to %.0f s for %d nodes (num-clients)", cfg.node_wait_timeout, cfg.num_clients)
    while len(nodes) < cfg.num_clients and time.monotonic() < deadline:
        time.sleep(WAIT_POLL_S)
        nodes = list(grid.get_node_ids())
    if len(nodes) < cfg.min_clients:
        raise QuorumError(
            f"only {len(nodes)} nodes connected after {cfg.node_wait_timeout:.0f} s, min-clients is "
            f"{cfg.min_clients}; start more SuperNodes (in simulation: --federation-config "
            f"'num-supernodes={cfg.num_clients}') or lower min-clients"
        )
    log(INFO, "%d of %d expected nodes connected", len(nodes), cfg.num_clients)
    return sorted(nodes)


@dataclass
class Pace:
    """How long each node took over its last timed answer (the timings its accepted replies carry), so the slowest
    are asked first: with a window of questions (`max-in-flight`), as a simulation's few workers have, the longest
    answers start first and the workers finish together (longest processing time first)."""

    seconds: dict[int, float] = field(default_factory=dict)

    def order(self, nodes: list[int]) -> list[int]:
        """`nodes`, slowest first; nodes not timed yet before them all, in their given order."""
        return sorted(nodes, key=lambda node: -self.seconds.get(node, math.inf))

    def update(self, replies: Mapping[int, Any]) -> None:
        """Take in the timings of a round's accepted replies (node -> parsed reply); untimed replies change nothing."""
        for node, reply in replies.items():
            if (timings := getattr(reply, "timings", None)) is not None:
                self.seconds[node] = timings.total


def soft_label_round(grid: Grid, cfg: RunConfig, trail: AuditTrail, query: SoftLabelQuery, nodes: list[int],
                     fold: Fold[SoftLabelReply] | None = None, pace: Pace | None = None) -> Exchange[SoftLabelReply]:
    """Open the round in the ledger, query every node (folding each accepted reply in, with `fold`; the slowest
    first by `pace`, which then takes in this round's timings), record each verdict."""
    trail.round_opened(query, query.to_record(), nodes)
    replies = query_soft_labels(grid, pace.order(nodes) if pace else nodes, query, cfg.round_timeout,
                                partial(trail.check_reply, query), trail.witnessing, fold, cfg.max_in_flight)
    trail.record_replies(query.round, replies)
    if pace is not None:
        pace.update(replies.accepted)
    return replies


def query_soft_labels(
    grid: Grid, nodes: list[int], query: SoftLabelQuery, timeout: float, check: Check | None = None,
    witness: Witnessing | None = None, fold: Fold[SoftLabelReply] | None = None, window: int = 0,
) -> Exchange[SoftLabelReply]:
    """Send `query` to every node (at most `window` unanswered at once; 0: all at once) and keep the replies that
    pass `check` (the audit trail's attestation check), validation and, with `witness`, the witnessing of the ledger;
    `fold` takes in each as it passes."""
    record = query.to_record()  # one record for every node: its sample ids are not copied n times
    messages = ask({node: record for node in nodes}, SOFT_LABELS_TYPE, str(query.round))
    return exchange(grid, messages, timeout, partial(SoftLabelReply.from_record, query=query), check, SOFT_LABELS,
                    query.round, witness, fold, window)


def folding(running: RunningAggregate, trail: AuditTrail) -> Fold[SoftLabelReply]:
    """Fold each accepted reply's rows into `running` as soon as it is judged, its size capped at the agreed
    max-examples of the institution it signed as (the audit trail's binding), and keep the reply without its rows:
    the round's soft labels live only in the running aggregate."""
    def fold(node: int, reply: SoftLabelReply) -> SoftLabelReply:
        caps = trail.weight_caps([node])
        running.fold(reply.soft_labels, reply.num_examples, reply.class_counts, math.inf if caps is None else caps[0])
        return replace(reply, soft_labels=np.empty((0, reply.soft_labels.shape[1]), dtype=np.float32))
    return fold


def require_quorum(replies: Exchange[Any], cfg: RunConfig, round_: int) -> None:
    if len(replies.accepted) < cfg.min_clients:
        reasons = "; ".join(f"node {n}: {r}" for n, r in sorted(replies.rejected.items())[:3])
        raise QuorumError(
            f"round {round_}: {len(replies.accepted)} valid replies, min-clients is {cfg.min_clients} "
            f"({reasons})"
        )


def make_query(cfg: RunConfig, round_: int, fingerprint: str, public_size: int, num_classes: int) -> SoftLabelQuery:
    """This round's query: its public samples, temperature (schedule) and codec."""
    return SoftLabelQuery(
        round=round_, fingerprint=fingerprint, temperature=temperature_at(cfg, round_), codec=cfg.codec,
        num_classes=num_classes, sample_ids=sample_public(cfg, round_, public_size),
        evaluate_teacher=cfg.evaluate_teachers and round_ == cfg.num_server_rounds,
        want_class_counts=cfg.aggregation in NEEDS_CLASS_COUNTS, top_k=min(cfg.codec_top_k, num_classes),
    )


def sample_public(cfg: RunConfig, round_: int, public_size: int) -> np.ndarray:
    """Sorted ids of the public samples used this round: all of them, a seeded `public-fraction`, or
    under PATE the `pate-queries` samples the institutions answer (each answer spends privacy)."""
    count = cfg.pate_queries if cfg.privacy == "pate" else max(1, round(cfg.public_fraction * public_size))
    if count >= public_size:
        return np.arange(public_size, dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, round_])
    return np.sort(rng.choice(public_size, size=count, replace=False)).astype(np.int64)


def digest_round(grid: Grid, cfg: RunConfig, trail: AuditTrail, instruction: DigestInstruction,
                 nodes: list[int], pace: Pace | None = None) -> Exchange[DigestReply]:
    """FedMD: open the digest step in the ledger, send the consensus down (the slowest first by `pace`), record each
    verdict."""
    trail.digest_opened(instruction, instruction.to_record(), nodes)
    outcome = send_digest(grid, pace.order(nodes) if pace else nodes, instruction, cfg.round_timeout,
                          partial(trail.check_digest_reply, instruction), trail.witnessing, cfg.max_in_flight)
    trail.record_replies(instruction.round, outcome, phase=DIGEST.name)
    return outcome


def send_digest(
    grid: Grid, nodes: list[int], instruction: DigestInstruction, timeout: float, check: Check | None = None,
    witness: Witnessing | None = None, window: int = 0,
) -> Exchange[DigestReply]:
    """FedMD: send the consensus down (at most `window` unanswered at once; 0: all); check each answer (attestation
    first, then its schema)."""
    messages = ask({node: instruction.to_record() for node in nodes}, DIGEST_TYPE, f"{instruction.round}-digest")
    return exchange(grid, messages, timeout, DigestReply.from_record, check, DIGEST, instruction.round, witness,
                    window=window)


WITNESS = Phase(kinds.WITNESS_PHASE)


def witness_end(grid: Grid, cfg: RunConfig, trail: AuditTrail, fingerprint: str, round_: int) -> Exchange[Any] | None:
    """After the closing entry: every node still connected that answered in this run cosigns the ledger's final
    tree head (its request rides in `query.witness`; the cosignatures follow the closing entry). None when the
    run has no allow-list, so no witnessing."""
    if trail.witnessing is None:
        return None
    nodes = sorted(set(trail.bindings) & set(grid.get_node_ids()))
    if not nodes:  # nobody answered in this run: nobody to witness its end
        return None
    record = WitnessCall(round_).to_record()
    trail.exchange_opened(WITNESS.name, round_, {node: record for node in nodes})
    outcome = exchange(grid, ask({node: record for node in nodes}, WITNESS_TYPE, f"{round_}-witness"), cfg.round_timeout,
                       read_cosignature, partial(trail.check_exchange, round_, fingerprint), WITNESS, round_, trail.witnessing,
                       window=cfg.max_in_flight)
    trail.record_replies(round_, outcome, phase=WITNESS.name)
    log(INFO, "the final tree head of the ledger was cosigned by %d of %d institution(s)", len(outcome.accepted), len(nodes))
    return outcome
