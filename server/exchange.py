"""The one path of every exchange with the institutions: push the messages, pull the replies as they arrive, judge
each one at once.

Each reply is judged in one order: a node's error reply first, then its attestation (the audit trail's check),
then its schema (the message type's `from_record`), then, when the ledger is witnessed, the cosignature it
carried. A bad reply is dropped with its reason and the name of the failed check, never raised: no reply, however
malformed, may crash the server. An exchange that `fold`s (the soft-label round) hands each accepted reply to the
fold as soon as it is judged, and keeps only what the fold returns and what the ledger and results need (verdicts,
attestations, digests, bytes): the server does not hold every reply until the last. The others keep each reply.
The exchange ends when every node has answered, or at the deadline (`timeout`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any, Generic, TypeVar

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.audit.attestation import Attestation, claimed_institution
from common.audit.naming import refusal_naming, refusing_institution
from common.errors import AuditError, FedstillError
from common.messages import read_attestation, read_cosignature, record_digest, record_nbytes, with_witness_request
from server.witness import Witnessing

R = TypeVar("R")
Check = Callable[[int, RecordDict], "Attestation | None"]  # the audit trail's attestation check; AuditError if bad
Fold = Callable[[int, R], R]  # (node, its accepted reply) -> what to keep of it, once its payload is folded in
PULL_INTERVAL_S = 0.1  # the first wait after a pull that brought nothing, as Flower's in-memory Grid waits
MAX_PULL_INTERVAL_S = 1.0  # the wait doubles while nothing arrives, up to this: a long round costs few pulls
PULL_INTERVAL_PER_CHUNK_S = 0.25  # ... and up to this per chunk of replies awaited: few awaited, soon noticed
PULL_CHUNK = 32  # replies asked for in one pull: the server holds at most this many unjudged replies at once


@dataclass(frozen=True)
class Clock:
    """How the exchange tells time and waits (the unit suite gives it a virtual one)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


CLOCK = Clock()


@dataclass(frozen=True)
class Phase:
    """One kind of exchange: its name (the ledger's `phase`) and how it words a dropped reply.

    Each kind keeps the wording it had before they shared this path: the ledger and results.json hold it.
    """

    name: str
    malformed: str = "{error}"  # the schema refused the reply (a FedstillError)
    unreadable: str = "unreadable reply ({error})"  # the reply broke its parser (any other exception)
    silent: str = "no reply within round-timeout={timeout:g} s"
    counts_uplink: bool = True  # the digest phase has never counted its replies' bytes


@dataclass
class Exchange(Generic[R]):
    """One exchange, judged: each node's parsed reply (or what a fold kept of it), or why it was dropped and which
    check failed; what each node claimed to sign; each reply's digest; the bytes both ways."""

    downlink_bytes: int = 0
    accepted: dict[int, R] = field(default_factory=dict)  # node id -> parsed reply, in arrival order
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> reason
    checks: dict[int, str] = field(default_factory=dict)  # rejected node id -> the check that failed
    attestations: dict[int, Attestation | None] = field(default_factory=dict)  # node id -> what it signed
    payload_digests: dict[int, tuple[str, int]] = field(default_factory=dict)  # node id -> (sha256, bytes)
    uplink_bytes: dict[int, int] = field(default_factory=dict)  # node id -> bytes received
    replies: dict[int, Message] = field(default_factory=dict)  # node id -> its reply as received (not when folding)
    wait_s: float = 0.0  # from pushing the messages to the last reply (or the deadline), less judging and folding
    validate_s: float = 0.0  # judging the replies (error, attestation, schema, cosignature): server.profile
    fold_s: float = 0.0  # folding accepted replies into the running aggregate as they arrive
    ledger_s: float = 0.0  # ledger appends made while judging (cosignatures): the profile's `ledger`, in neither above

    def reject(self, node: int, reason: str, check: str) -> None:
        self.rejected[node], self.checks[node] = reason, check

    def judged(self, node: int) -> bool:
        return node in self.accepted or node in self.rejected


def ask(records: Mapping[int, RecordDict], message_type: str, group_id: str) -> list[Message]:
    """One message per node, each carrying that node's record."""
    return [Message(content=record, dst_node_id=node, message_type=message_type, group_id=group_id)
            for node, record in records.items()]


def exchange(
    grid: Grid, messages: list[Message], timeout: float, parse: Callable[[RecordDict], R], check: Check | None,
    phase: Phase, round_: int, witness: Witnessing | None = None, fold: Fold[R] | None = None, window: int = 0,
) -> Exchange[R]:
    """Push `messages`, pull the replies as they arrive within `timeout` and judge each at once: node error, then
    attestation (`check`; None: no attestation is asked of this exchange), then schema (`parse`), then, when the
    ledger is witnessed (`witness`), the cosignature of the tree head each message carried, then `fold` (when given):
    it takes in the accepted reply's payload and returns what to keep; a FedstillError it raises drops the reply.
    `window`: the most questions unanswered at once (`stream`; 0: all pushed at once)."""
    if witness is not None and messages:
        requests = witness.requests([m.metadata.dst_node_id for m in messages])
        messages = [_with_request(m, requests[m.metadata.dst_node_id]) for m in messages]
    result: Exchange[R] = Exchange(downlink_bytes=sum(record_nbytes(m.content) for m in messages))
    started = time.perf_counter()
    for node, reply in stream(grid, messages, timeout, window):
        if result.judged(node):  # one verdict per node: a second reply is never judged, nor folded twice
            log(WARNING, "round %d %s: ignored a second reply from node %d", round_, phase.name, node)
            continue
        if fold is None:
            result.replies[node] = reply
        judging, appending = time.perf_counter(), _ledger_busy(witness)
        _judge(result, node, reply, parse, check, phase)
        if witness is not None and node in result.accepted:
            _witnessed(result, node, reply, witness)
        folding, appended = time.perf_counter(), _ledger_busy(witness) - appending
        result.validate_s += folding - judging - appended
        result.ledger_s += appended
        if fold is not None and node in result.accepted:
            _folded(result, node, fold)
        result.fold_s += time.perf_counter() - folding
    result.wait_s = max(0.0, time.perf_counter() - started - result.validate_s - result.fold_s - result.ledger_s)
    for node in [m.metadata.dst_node_id for m in messages]:
        if not result.judged(node):
            result.reject(node, phase.silent.format(timeout=timeout), "timeout")
    for node, reason in sorted(result.rejected.items()):
        log(WARNING, "round %d %s: dropped node %d: %s", round_, phase.name, node, reason)
    return result


def _witnessed(result: Exchange[R], node: int, reply: Message, witness: Witnessing) -> None:
    """Record the cosignature the reply carried; a missing or bad one drops the reply."""
    attestation = result.attestations.get(node)
    problem = witness.record(node, claimed_institution(attestation), read_cosignature(reply.content))
    if problem is not None:
        del result.accepted[node]
        result.reject(node, f"witness: {problem}", "witness")


def _folded(result: Exchange[R], node: int, fold: Fold[R]) -> None:
    """Fold the accepted reply in and keep what the fold returns; a reply the fold refuses is dropped (the fold
    leaves its aggregate as it was)."""
    try:
        result.accepted[node] = fold(node, result.accepted[node])
    except FedstillError as problem:
        del result.accepted[node]
        result.reject(node, f"{type(problem).__name__}: {problem}", "format")


def _judge(result: Exchange[R], node: int, reply: Message, parse: Callable[[RecordDict], R], check: Check | None,
           phase: Phase) -> None:
    if reply.has_error():
        reason = str(reply.error.reason)
        result.reject(node, _node_error(reason), node_error_check(reason))
        return
    content = reply.content
    if phase.counts_uplink:
        result.uplink_bytes[node] = record_nbytes(content)
    try:
        result.payload_digests[node] = record_digest(content)
        result.attestations[node] = _claimed_attestation(content)  # kept for the ledger, even if rejected
        if check is not None:
            result.attestations[node] = check(node, content)
        result.accepted[node] = parse(content)
    except AuditError as problem:
        result.reject(node, f"{type(problem).__name__}: {problem}", problem.check)
    except FedstillError as problem:
        result.reject(node, phase.malformed.format(error=f"{type(problem).__name__}: {problem}"), "format")
    except Exception as problem:  # noqa: BLE001 - no reply, however malformed, may crash the server
        result.reject(node, phase.unreadable.format(error=f"{type(problem).__name__}: {problem}"), "format")


def _with_request(message: Message, request: Any) -> Message:
    return Message(content=with_witness_request(message.content, request), dst_node_id=message.metadata.dst_node_id,
                   message_type=message.metadata.message_type, group_id=message.metadata.group_id, ttl=message.metadata.ttl)


def stream(grid: Grid, messages: list[Message], timeout: float, window: int = 0) -> Iterator[tuple[int, Message]]:
    """Push `messages`, then yield (node, reply) for each reply as it arrives, until every pushed message has its
    reply or `timeout` s have passed. Replies are pulled `PULL_CHUNK` at a time, so the caller judges each before
    the next are fetched; after a round of pulls that brought nothing the stream waits, `PULL_INTERVAL_S` at first,
    twice as long each time nothing comes, at most `pull_interval_cap` of the replies still awaited.

    `window` > 0 keeps at most that many questions unanswered at once (run config `max-in-flight`): the rest are
    pushed as replies come in, all within the same `timeout`. Flower's in-memory SuperLink scans every stored question
    for each node it serves, so with all n pushed at once a simulation spends O(n^2) a sweep; 0 pushes all at once.

    The node is the one the reply's question went to: when a node stops sending heartbeats, the SuperLink itself
    answers for it with a "Node Unavailable" error whose source is the SuperLink, not the node; matching on the
    question keeps it on the right node."""
    if not messages:
        return
    clock = CLOCK
    deadline = clock.now() + timeout
    queued, pending, asked = list(messages), list[str](), Asked()
    wait = PULL_INTERVAL_S
    while True:
        pending += asked.push(grid, queued, (window or len(messages)) - len(pending))
        answered = set()
        for start in range(0, len(pending), PULL_CHUNK):
            for reply in grid.pull_messages(pending[start:start + PULL_CHUNK]):
                answered.add(reply.metadata.reply_to_message_id)
                yield asked.node(reply), reply
        pending = [i for i in pending if i not in answered]
        left = deadline - clock.now()
        if (not pending and not queued) or left <= 0:
            return
        if answered:
            wait = PULL_INTERVAL_S
        elif not queued or len(pending) >= window:
            clock.sleep(min(wait, left))
            wait = min(2 * wait, pull_interval_cap(len(pending)))


def pull_interval_cap(awaited: int) -> float:
    """The longest wait between two pulls while `awaited` replies are outstanding: `PULL_INTERVAL_PER_CHUNK_S` per
    chunk of `PULL_CHUNK` (each chunk is one pull request), at most `MAX_PULL_INTERVAL_S`. The last replies of a
    round are noticed within a quarter second, and a window of questions (`max-in-flight`) is refilled as soon,
    while a deployment awaiting a thousand replies still pulls about once a second."""
    return min(MAX_PULL_INTERVAL_S, PULL_INTERVAL_PER_CHUNK_S * max(1, math.ceil(awaited / PULL_CHUNK)))


def _ledger_busy(witness: Witnessing | None) -> float:
    """Seconds the witnessed ledger has spent appending so far (0 without witnessing: judging then appends nothing)."""
    return 0.0 if witness is None else witness.ledger.busy_s


@dataclass
class Asked:
    """Which node each pushed question went to, by message id; `trusted` turns False when the grid gives a pushed
    question no id (then each reply's source names its node)."""

    nodes: dict[str, int] = field(default_factory=dict)
    trusted: bool = True

    def push(self, grid: Grid, queued: list[Message], room: int) -> list[str]:
        """Push up to `room` of the `queued` messages (taken off it); the ids Flower gave them."""
        batch = [queued.pop(0) for _ in range(min(max(room, 0), len(queued)))]
        if not batch:
            return []
        ids = [i for i in grid.push_messages(batch) if i]  # a message Flower could not push gets no id
        self.nodes.update({m.metadata.message_id: m.metadata.dst_node_id for m in batch if m.metadata.message_id})
        self.trusted = self.trusted and all(m.metadata.message_id for m in batch)  # set when pushed
        return ids

    def node(self, reply: Message) -> int:
        asked = self.nodes.get(reply.metadata.reply_to_message_id) if self.trusted else None
        return reply.metadata.src_node_id if asked is None else asked


def collect(grid: Grid, messages: list[Message], timeout: float, window: int = 0) -> list[tuple[int, Message]]:
    """(node, reply) for each reply within `timeout`, in arrival order (`stream`, gathered)."""
    return list(stream(grid, messages, timeout, window))


def short_reason(reason: str, limit: int = 600) -> str:
    """A node's error as one readable line: the exception's own message, not the simulation engine's traceback."""
    marker = "Message: "
    if marker in reason:
        reason = reason[reason.rindex(marker) + len(marker):]
        reason = re.sub(r"['\">)\s]+$", "", reason)
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


NODE_REFUSALS = {"PrivacyBudgetExceeded": "privacy-budget", "PolicyViolation": "site-policy"}  # error -> ledger check


def node_error_check(reason: str) -> str:
    """The ledger's name for an error reply: a refusal on privacy budget or by the site policy is told apart
    from a failure."""
    return next((check for error, check in NODE_REFUSALS.items() if error in reason), "node-error")


def _node_error(reason: str) -> str:
    """The ledger's reason for an error reply: one line, the refusal's type first, and the institution a refusal
    names itself as kept even when the line is shortened (common.audit.naming: the only name an error reply has)."""
    check = node_error_check(reason)
    prefix = next((f"{error}: " for error, named in NODE_REFUSALS.items() if named == check), "")
    text = short_reason(reason)
    if check != "node-error" and (claimed := refusing_institution(reason)) and refusing_institution(text) != claimed:
        text = refusal_naming(short_reason(reason, 500), claimed)
    return f"node error: {text if text.startswith(prefix) else prefix + text}"


def _claimed_attestation(content: RecordDict) -> Attestation | None:
    try:
        return read_attestation(content)
    except FedstillError:
        return None
