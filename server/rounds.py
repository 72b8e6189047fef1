"""One round's exchange with the institutions: wait for nodes, query them, validate what comes back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import FedstillError, QuorumError
from common.messages import SOFT_LABELS_TYPE, SoftLabelQuery, SoftLabelReply, record_nbytes

WAIT_POLL_S = 1.0
INFO, WARNING = 20, 30


@dataclass
class RoundReplies:
    """Validated replies of one round, what was rejected and why, and the bytes each way."""

    accepted: dict[int, SoftLabelReply] = field(default_factory=dict)  # node id -> reply
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> reason
    uplink_bytes: dict[int, int] = field(default_factory=dict)  # node id -> bytes received
    downlink_bytes: int = 0


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


def query_soft_labels(grid: Grid, nodes: list[int], query: SoftLabelQuery, timeout: float) -> RoundReplies:
    """Send `query` to every node and keep the replies that pass validation."""
    messages = [
        Message(content=query.to_record(), dst_node_id=node, message_type=SOFT_LABELS_TYPE, group_id=str(query.round))
        for node in nodes
    ]
    answers = [
        (reply.metadata.src_node_id, reply.error.reason if reply.has_error() else None,
         None if reply.has_error() else reply.content)
        for reply in grid.send_and_receive(messages, timeout=timeout)
    ]
    return judge_replies(query, nodes, answers, timeout)


def judge_replies(
    query: SoftLabelQuery, nodes: list[int], answers: list[tuple[int, str | None, RecordDict | None]], timeout: float
) -> RoundReplies:
    """Validate each `(node, error reason, content)` answer; a bad one is dropped with its reason, never raised."""
    result = RoundReplies(downlink_bytes=record_nbytes(query.to_record()) * len(nodes))
    for node, error, content in answers:
        if error is not None or content is None:
            result.rejected[node] = f"node error: {error}"
            continue
        result.uplink_bytes[node] = record_nbytes(content)
        try:
            result.accepted[node] = SoftLabelReply.from_record(content, query)
        except FedstillError as problem:
            result.rejected[node] = f"{type(problem).__name__}: {problem}"
        except Exception as problem:  # noqa: BLE001 - no reply, however malformed, may crash the server
            result.rejected[node] = f"unreadable reply ({type(problem).__name__}: {problem})"
    for node in set(nodes) - set(result.accepted) - set(result.rejected):
        result.rejected[node] = f"no reply within round-timeout={timeout:g} s"
    for node, reason in sorted(result.rejected.items()):
        log(WARNING, "round %d: dropped node %d: %s", query.round, node, reason)
    return result


def require_quorum(replies: RoundReplies, cfg: RunConfig, round_: int) -> None:
    if len(replies.accepted) < cfg.min_clients:
        reasons = "; ".join(f"node {n}: {r}" for n, r in sorted(replies.rejected.items())[:3])
        raise QuorumError(
            f"round {round_}: {len(replies.accepted)} valid replies, min-clients is {cfg.min_clients} "
            f"({reasons})"
        )


def make_query(cfg: RunConfig, round_: int, fingerprint: str, public_size: int, num_classes: int) -> SoftLabelQuery:
    """This round's query: every public sample, the configured temperature and codec."""
    return SoftLabelQuery(
        round=round_, fingerprint=fingerprint, temperature=cfg.temperature, codec=cfg.codec,
        num_classes=num_classes, sample_ids=np.arange(public_size, dtype=np.int64),
        evaluate_teacher=cfg.evaluate_teachers and round_ == cfg.num_server_rounds,
    )
