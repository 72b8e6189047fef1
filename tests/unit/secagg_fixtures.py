"""Institutions for secure-aggregation tests: the suite's in-memory Grid handing each message to the institutions'
real steps (client/secure.py), each with its own node state, signing identity and copy of the allow-list, and each
reply signed and logged as the ClientApp does (client/release.py sign_and_log). Soft labels and weights are given,
so a test runs the whole protocol without training.

`lie` lets a node alter its own reply before it signs it (a faulty or lying peer: the signature holds); `tamper`
alters a reply after it was signed (in transit: the attestation no longer holds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict

from client.release import Identity, sign_and_log
from client.secure import (
    Credentials,
    masked_vector,
    open_inbox,
    round_keys,
    share_bundles,
    sign_survivors,
    unmask_shares,
)
from common.audit.keys import Signer, write_allow_list
from common.config import RunConfig
from common.messages import (
    CONSISTENCY_TYPE,
    INBOX_TYPE,
    SETUP_TYPE,
    SHARES_TYPE,
    SOFT_LABELS_TYPE,
    UNMASK_TYPE,
    MaskedReply,
    SecAggConsistency,
    SecAggInbox,
    SecAggRoster,
    SecAggSetup,
    SecAggUnmask,
    SoftLabelQuery,
)

from audit_fixtures import cosigned
from grid import Answer, MemoryGrid

RUN_ID = 2**63 - 25  # Flower's run ids are 64-bit
FINGERPRINT = "ab" * 32
SAMPLES, CLASSES = 6, 3
NODES = [2**63 + 11, 2**63 + 12, 2**63 + 13, 2**63 + 14, 2**63 + 15]  # uint64 node ids, past int64
WEIGHTS = {node: float(w) for node, w in zip(NODES, (50, 120, 300, 75, 999), strict=True)}  # len(private) of each
RELEASE_KINDS = {SETUP_TYPE: "secagg-keys", SHARES_TYPE: "secagg-bundles", INBOX_TYPE: "secagg-complaints",
                 SOFT_LABELS_TYPE: "secagg-masked", CONSISTENCY_TYPE: "secagg-signature", UNMASK_TYPE: "secagg-shares"}
Hook = Callable[[int, str, RecordDict], RecordDict]


def make_query(round_: int = 1) -> SoftLabelQuery:
    return SoftLabelQuery(round=round_, fingerprint=FINGERPRINT, temperature=2.0, codec="float16", num_classes=CLASSES,
                          sample_ids=np.arange(SAMPLES, dtype=np.int64), evaluate_teacher=False)


def soft_labels(nodes: list[int] = NODES) -> dict[int, np.ndarray]:
    """(SAMPLES, CLASSES) float32 rows on the simplex, different for every institution."""
    rng = np.random.default_rng(17)
    return {node: rng.dirichlet(np.ones(CLASSES), size=SAMPLES).astype(np.float32) for node in nodes}


PROBS = soft_labels()


@dataclass(frozen=True)
class Sites:
    """Each node's signing identity (and release log) and the consortium's allow-list, written as a file."""

    identities: dict[int, Identity]
    allow_list: Path

    @property
    def peers(self) -> dict[str, str]:
        return {identity.signer.name: identity.signer.public for identity in self.identities.values()}

    def credentials(self, node: int) -> Credentials:
        return Credentials(self.identities[node].signer, self.peers)

    def institution(self, node: int) -> str:
        return self.identities[node].signer.name


def provision(folder: Path, nodes: list[int] = NODES) -> Sites:
    """Keys for `nodes` (institution-0, institution-1, ... in node order) and the allow-list of all of them."""
    folder.mkdir(parents=True, exist_ok=True)
    identities = {node: Identity(Signer.generate(f"institution-{i}"), folder / f"institution-{i}.jsonl")
                  for i, node in enumerate(nodes)}
    sites = Sites(identities, folder / "allow-list.toml")
    write_allow_list(sites.allow_list, sites.peers)
    return sites


def secure_config(mapping: dict[str, Any], sites: Sites, **overrides: Any) -> RunConfig:
    raw = dict(mapping)
    raw.update({"secure-aggregation": True, "aggregation": "mean", "num-clients": len(NODES), "min-clients": 3,
                "allow-list": str(sites.allow_list), "coordinator-key": "", "round-timeout": 30.0})
    raw.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return RunConfig.from_run_config(raw)


class Institutions(MemoryGrid):
    """The in-memory Grid, each message going to that node's real secure-aggregation step with its own node state;
    `failing` makes a node answer a message type with an error reply or not at all. Every content the server
    receives is kept."""

    def __init__(self, sites: Sites, probs: dict[int, np.ndarray] = PROBS, weights: dict[int, float] = WEIGHTS, *,
                 failing: dict[tuple[int, str], str] | None = None, lie: Hook | None = None,
                 tamper: Hook | None = None) -> None:
        super().__init__(nodes=probs)
        self.sites, self.probs, self.weights = sites, probs, weights
        self.failing = failing or {}
        self.lie, self.tamper = lie, tamper
        self.states = {node: RecordDict() for node in probs}
        self.received: list[tuple[int, str, RecordDict]] = []

    def answer(self, message: Message) -> Answer:
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        failure = self.failing.get((node, kind))
        if failure == "silent":
            return None
        if failure == "error":
            raise RuntimeError("lost connection")
        content, round_ = self.step(node, kind, message.content)
        if self.lie is not None:
            content = self.lie(node, kind, content)
        content = cosigned(self.sites.identities[node], message, content)
        content = sign_and_log(self.sites.identities[node], content, message.content, run_id=RUN_ID, round_=round_,
                               node_id=node, fingerprint=FINGERPRINT, kind=RELEASE_KINDS[kind])
        if self.tamper is not None:
            content = self.tamper(node, kind, content)
        self.received.append((node, kind, content))
        return content

    def step(self, node: int, kind: str, content: RecordDict) -> tuple[RecordDict, int]:
        """The node's step for a message of type `kind`: its reply's content and the round."""
        state, me = self.states[node], self.sites.credentials(node)
        if kind == SETUP_TYPE:
            round_ = SecAggSetup.from_record(content).round
            return round_keys(state, RUN_ID, node, me, round_).to_record(), round_
        if kind == SHARES_TYPE:
            roster = SecAggRoster.from_record(content)
            assert roster is not None
            return share_bundles(state, RUN_ID, node, me, roster).to_record(), roster.round
        if kind == INBOX_TYPE:
            inbox = SecAggInbox.from_record(content)
            return open_inbox(state, RUN_ID, node, me, inbox).to_record(), inbox.round
        if kind == SOFT_LABELS_TYPE:
            query, shared = SoftLabelQuery.from_record(content), SecAggRoster.from_record(content)
            assert shared is not None
            weight = self.weights[node] if shared.weighted else 1.0
            masked = masked_vector(state, RUN_ID, node, shared, self.probs[node], weight)
            reply = MaskedReply(query.round, query.fingerprint, masked, train_loss=0.4, teacher_accuracy=-1.0,
                                teacher_params=1000, teacher_rounds=query.round)
            return reply.to_record(), query.round
        if kind == CONSISTENCY_TYPE:
            request = SecAggConsistency.from_record(content)
            return sign_survivors(state, RUN_ID, node, me, request).to_record(), request.round
        if kind == UNMASK_TYPE:
            unmask = SecAggUnmask.from_record(content)
            return unmask_shares(state, RUN_ID, node, me, unmask).to_record(), unmask.round
        raise AssertionError(f"unexpected message type {kind}")

    def destinations(self, kind: str) -> list[int]:
        return sorted(m.metadata.dst_node_id for m in self.sent_of(kind))
