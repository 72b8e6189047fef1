"""One round's exchange with the institutions: wait for nodes, query them, validate what comes back."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.aggregation import NEEDS_CLASS_COUNTS
from common.audit.attestation import Attestation
from common.config import RunConfig, temperature_at
from common.errors import AuditError, FedstillError, QuorumError
from common.messages import (
    DIGEST_TYPE, SOFT_LABELS_TYPE, DigestInstruction, DigestReply, SoftLabelQuery, SoftLabelReply, read_attestation,
    record_digest, record_nbytes,
)

WAIT_POLL_S = 1.0
INFO, WARNING = 20, 30


@dataclass
class RoundReplies:
    """Validated replies of one round, what was rejected and why, and the bytes each way."""

    accepted: dict[int, SoftLabelReply] = field(default_factory=dict)  # node id -> reply
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> reason
    uplink_bytes: dict[int, int] = field(default_factory=dict)  # node id -> bytes received
    downlink_bytes: int = 0
    checks: dict[int, str] = field(default_factory=dict)  # rejected node id -> the check that failed
    attestations: dict[int, Attestation | None] = field(default_factory=dict)  # node id -> what it signed
    payload_digests: dict[int, tuple[str, int]] = field(default_factory=dict)  # node id -> (sha256, bytes)


ReplyCheck = Callable[[int, RecordDict], "Attestation | None"]


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


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[tuple[int, Message]]:
    """(node, reply) for each reply, the node being the one its question went to. When a node stops
    sending heartbeats, the SuperLink itself answers for it with a "Node Unavailable" error whose
    source is the SuperLink, not the node; matching on the question keeps it on the right node."""
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    ids = [getattr(getattr(m, "metadata", None), "message_id", "") for m in messages]  # set when pushed
    asked = {i: m.metadata.dst_node_id for i, m in zip(ids, messages) if i}
    if len(asked) != len(messages):  # a grid that did not give the questions ids: trust each reply's source
        asked = {}
    return [(asked.get(getattr(r.metadata, "reply_to_message_id", ""), r.metadata.src_node_id), r) for r in replies]


def query_soft_labels(
    grid: Grid, nodes: list[int], query: SoftLabelQuery, timeout: float, check: ReplyCheck | None = None
) -> RoundReplies:
    """Send `query` to every node and keep the replies that pass `check` (the audit trail's attestation
    check) and validation."""
    messages = [
        Message(content=query.to_record(), dst_node_id=node, message_type=SOFT_LABELS_TYPE, group_id=str(query.round))
        for node in nodes
    ]
    answers = [
        (node, reply.error.reason if reply.has_error() else None, None if reply.has_error() else reply.content)
        for node, reply in send_and_receive(grid, messages, timeout)
    ]
    return judge_replies(query, nodes, answers, timeout, check)


def judge_replies(
    query: SoftLabelQuery, nodes: list[int], answers: list[tuple[int, str | None, RecordDict | None]], timeout: float,
    check: ReplyCheck | None = None,
) -> RoundReplies:
    """Check each `(node, error reason, content)` answer: first its attestation (`check`), then its schema.

    A bad answer is dropped with its reason and the name of the failed check, never raised.
    """
    result = RoundReplies(downlink_bytes=record_nbytes(query.to_record()) * len(nodes))
    for node, error, content in answers:
        if error is not None or content is None:
            result.rejected[node], result.checks[node] = _node_error(str(error)), node_error_check(str(error))
            continue
        result.uplink_bytes[node] = record_nbytes(content)
        try:
            result.payload_digests[node] = record_digest(content)
            result.attestations[node] = _claimed_attestation(content)  # kept for the ledger, even if rejected
            if check is not None:
                result.attestations[node] = check(node, content)
            result.accepted[node] = SoftLabelReply.from_record(content, query)
        except AuditError as problem:
            result.rejected[node], result.checks[node] = f"{type(problem).__name__}: {problem}", problem.check
        except FedstillError as problem:
            result.rejected[node], result.checks[node] = f"{type(problem).__name__}: {problem}", "format"
        except Exception as problem:  # noqa: BLE001 - no reply, however malformed, may crash the server
            result.rejected[node], result.checks[node] = f"unreadable reply ({type(problem).__name__}: {problem})", "format"
    for node in set(nodes) - set(result.accepted) - set(result.rejected):
        result.rejected[node], result.checks[node] = f"no reply within round-timeout={timeout:g} s", "timeout"
    for node, reason in sorted(result.rejected.items()):
        log(WARNING, "round %d: dropped node %d: %s", query.round, node, reason)
    return result


def short_reason(reason: str, limit: int = 600) -> str:
    """A node's error as one readable line: the exception's own message, not the simulation engine's traceback."""
    marker = "Message: "
    if marker in reason:
        reason = reason[reason.rindex(marker) + len(marker):]
        reason = re.sub(r"['\">)\s]+$", "", reason)
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _node_error(reason: str) -> str:
    prefix = "PrivacyBudgetExceeded: " if node_error_check(reason) == "privacy-budget" else ""
    return f"node error: {prefix}{short_reason(reason)}"


def node_error_check(reason: str) -> str:
    """The ledger's name for an error reply: a refusal on privacy budget is told apart from a failure."""
    return "privacy-budget" if "PrivacyBudgetExceeded" in reason else "node-error"


def _claimed_attestation(content: RecordDict) -> Attestation | None:
    try:
        return read_attestation(content)
    except FedstillError:
        return None


def require_quorum(replies: RoundReplies, cfg: RunConfig, round_: int) -> None:
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


@dataclass
class DigestOutcome:
    """What came back from a FedMD digest step: who answered properly, who failed and why."""

    downlink_bytes: int = 0
    accepted: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)  # node id -> reason
    checks: dict[int, str] = field(default_factory=dict)  # failed node id -> the check that failed
    attestations: dict[int, Attestation | None] = field(default_factory=dict)
    payload_digests: dict[int, tuple[str, int]] = field(default_factory=dict)


def send_digest(
    grid: Grid, nodes: list[int], instruction: DigestInstruction, timeout: float, check: ReplyCheck | None = None
) -> DigestOutcome:
    """FedMD: send the consensus down; check each answer (attestation first, then its schema)."""
    messages = [
        Message(content=instruction.to_record(), dst_node_id=node, message_type=DIGEST_TYPE, group_id=f"{instruction.round}-digest")
        for node in nodes
    ]
    outcome = DigestOutcome(downlink_bytes=record_nbytes(instruction.to_record()) * len(nodes))
    for node, reply in send_and_receive(grid, messages, timeout):
        if reply.has_error():
            outcome.failed[node], outcome.checks[node] = _node_error(reply.error.reason), node_error_check(reply.error.reason)
            continue
        try:
            outcome.payload_digests[node] = record_digest(reply.content)
            outcome.attestations[node] = _claimed_attestation(reply.content)
            if check is not None:
                outcome.attestations[node] = check(node, reply.content)
            DigestReply.from_record(reply.content)
            outcome.accepted.add(node)
        except AuditError as problem:
            outcome.failed[node], outcome.checks[node] = f"{type(problem).__name__}: {problem}", problem.check
        except Exception as problem:  # noqa: BLE001 - a malformed reply may not crash the server
            outcome.failed[node], outcome.checks[node] = f"unreadable digest reply ({type(problem).__name__}: {problem})", "format"
    for node in set(nodes) - outcome.accepted - set(outcome.failed):
        outcome.failed[node], outcome.checks[node] = f"no digest reply within round-timeout={timeout:g} s", "timeout"
    for node, reason in sorted(outcome.failed.items()):
        log(WARNING, "round %d digest: node %d: %s", instruction.round, node, reason)
    return outcome
