"""A coordinator that deviates from the secure-aggregation protocol: the real ClientApp handlers of four provisioned
institutions (keys, their own allow-lists; the suite's in-memory Grid delivers the messages) refuse every deviation
that could open one institution's soft labels, and what the coordinator receives holds nothing beyond the sum.

The coordinator here is the test: it runs the honest steps (`Coordinator.honest_until`) and then deviates — a second
masked query, a roster with keys it made itself, a lowered threshold, different survivor sets for different nodes,
a second unmasking request for the other secret of a node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.app import Context, Message, RecordDict

from client import client_app
from client.node_state import teacher_meta
from common.audit.keys import Signer
from common.config import RunConfig, default_run_config
from common.messages import (
    CONSISTENCY_TYPE,
    INBOX_TYPE,
    SETUP_TYPE,
    SHARES_TYPE,
    SOFT_LABELS_TYPE,
    UNMASK_TYPE,
    MaskedReply,
    SecAggBundles,
    SecAggConsistency,
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggSignature,
    SecAggUnmask,
)
from common.secagg.protocol import Roster, make_roster
from common.secagg.signatures import keys_statement
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint
from server.exchange import ask, collect
from server.rounds import make_query
from simulations.provision import provision_sites

from grid import MemoryGrid

NODES = [21, 22, 23, 24]
A, B, C, D = NODES
RUN_ID = 9
HANDLERS: dict[str, Callable[[Message, Context], Message]] = client_app.HANDLERS

pytestmark = pytest.mark.usefixtures("server_task")


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    with torch.random.fork_rng():
        yield


class Federation(MemoryGrid):
    """Each message goes to the real ClientApp handler of its node, with that node's own state."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        super().__init__(nodes=NODES)
        self.mapping = mapping
        self.states = {node: RecordDict() for node in NODES}

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = Context(RUN_ID, node, {"partition-id": NODES.index(node), "num-partitions": len(NODES)},
                          self.states[node], self.mapping)
        return HANDLERS[message.metadata.message_type](message, context)


class Coordinator:
    """The test's coordinator: sends any message to any node and keeps every reply it receives."""

    def __init__(self, grid: Federation, cfg: RunConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.received: list[tuple[int, str, Message]] = []  # (node, message type, reply)
        split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed)
        self.query = make_query(cfg, 1, public_fingerprint(split.public), len(split.public), split.public.num_classes)
        self.keys: dict[int, SecAggKeys] = {}
        self.roster: Roster = {}
        self.bundles: dict[int, SecAggBundles] = {}

    def send(self, kind: str, records: dict[int, RecordDict]) -> dict[int, Message]:
        replies = dict(collect(self.grid, ask(records, kind, f"1-{kind}"), timeout=30.0))
        self.received += [(node, kind, reply) for node, reply in replies.items()]
        return replies

    def content(self, reply: Message) -> RecordDict:
        assert not reply.has_error(), reply.error.reason
        return reply.content

    def honest_until(self, step: str) -> None:
        """Run the honest protocol up to and including `step` ("keys", "shares", "inbox", "masked")."""
        replies = self.send(SETUP_TYPE, {n: SecAggSetup(1).to_record() for n in NODES})
        self.keys = {n: SecAggKeys.from_record(self.content(r), 1) for n, r in replies.items()}
        self.roster = make_roster({n: (k.mask_key, k.share_key) for n, k in self.keys.items()},
                                  {n: (k.institution, k.signature) for n, k in self.keys.items()})
        if step == "keys":
            return
        replies = self.send(SHARES_TYPE, {n: self.roster_message(self.roster).to_record() for n in NODES})
        self.bundles = {n: SecAggBundles.from_record(self.content(r), 1, self.roster) for n, r in replies.items()}
        if step == "shares":
            return
        inboxes = {n: SecAggInbox(1, {s: self.bundles[s].bundles[n] for s in NODES},
                                  {s: self.bundles[s].signatures[n] for s in NODES}).to_record() for n in NODES}
        assert all(self.content(r)["secagg-complaints"]["accused"] == [] for r in self.send(INBOX_TYPE, inboxes).values())
        if step == "inbox":
            return
        replies = self.masked(NODES, self.roster_message(self.roster))
        assert all(not r.has_error() for r in replies.values())

    def roster_message(self, roster: Roster, threshold: int = 3) -> SecAggRoster:
        return SecAggRoster(1, threshold, False, roster)

    def masked(self, nodes: list[int], roster: SecAggRoster) -> dict[int, Message]:
        return self.send(SOFT_LABELS_TYPE, {n: merge(self.query.to_record(), roster.to_record()) for n in nodes})

    def sign(self, shown: dict[int, list[int]]) -> dict[int, str]:
        """Step 5, with each node shown its own survivor set; the signatures of those that signed."""
        replies = self.send(CONSISTENCY_TYPE, {n: SecAggConsistency(1, s).to_record() for n, s in shown.items()})
        return {n: SecAggSignature.from_record(r.content, 1).signature for n, r in replies.items() if not r.has_error()}

    def unmask(self, node: int, survivors: list[int], signatures: dict[int, str]) -> Message:
        return self.send(UNMASK_TYPE, {node: SecAggUnmask(1, survivors, signatures).to_record()})[node]

    # --- what the coordinator holds --------------------------------------------------------------------------

    def masked_vectors(self) -> dict[int, list[np.ndarray]]:
        """Every masked vector received, by sender."""
        held: dict[int, list[np.ndarray]] = {}
        for node, kind, reply in self.received:
            if kind == SOFT_LABELS_TYPE and not reply.has_error():
                length = len(self.query.sample_ids) * self.query.num_classes + 1
                held.setdefault(node, []).append(MaskedReply.from_record(reply.content, 1, self.query.fingerprint, length).masked)
        return held

    def shares_held(self) -> dict[tuple[int, str], set[int]]:
        """(source node, "b" | "c") -> the nodes that gave the coordinator a share of that secret."""
        held: dict[tuple[int, str], set[int]] = {}
        for node, kind, reply in self.received:
            if kind == UNMASK_TYPE and not reply.has_error():
                for source, (secret, _) in SecAggShares.from_record(reply.content, 1).shares.items():
                    held.setdefault((source, secret), set()).add(node)
        return held

    def bundles_from(self, node: int) -> int:
        return sum(1 for n, kind, reply in self.received if n == node and kind == SHARES_TYPE and not reply.has_error())


def merge(first: RecordDict, second: RecordDict) -> RecordDict:
    for key, value in second.items():
        first[key] = value
    return first


def refusal(reply: Message) -> str:
    assert reply.has_error(), "the node answered a request it must refuse"
    return str(reply.error.reason)


def assert_nothing_beyond_the_sum(coordinator: Coordinator, threshold: int = 3) -> None:
    """At most one masked vector per node, and no node whose self seed and mask key could both be rebuilt."""
    assert all(len(vectors) == 1 for vectors in coordinator.masked_vectors().values())
    held = coordinator.shares_held()
    for node in NODES:
        assert not (len(held.get((node, "b"), ())) >= threshold and len(held.get((node, "c"), ())) >= threshold), node


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    """Four provisioned institutions (keys, allow-lists, sites) under secure aggregation, and the test's coordinator."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mapping = {**default_run_config(), "dataset": "digits", "public-size": 120, "num-clients": len(NODES), "min-clients": 3,
               "partitioner": "iid", "num-server-rounds": 1, "teacher-models": "mlp", "local-epochs": 1, "teacher-batch-size": 512,
               "secure-aggregation": True, "aggregation": "mean", **provision_sites(run_dir, len(NODES))}
    return Coordinator(Federation(mapping), RunConfig.from_run_config(mapping))


# --- one masked answer per round -------------------------------------------------------------------------------

def test_a_second_masked_query_in_a_round_is_refused_before_any_training(coordinator: Coordinator) -> None:
    # Prepare: every node masked once, with all four
    coordinator.honest_until("masked")
    trained = teacher_meta(coordinator.grid.states[A])

    # Execute: the same query again; then with a smaller set U (y1 - y2 would be a pairwise mask); then fresh keys
    again = coordinator.masked([A], coordinator.roster_message(coordinator.roster))[A]
    smaller = coordinator.masked([A], coordinator.roster_message({n: coordinator.roster[n] for n in (A, B, C)}))[A]
    rekeyed = coordinator.send(SETUP_TYPE, {A: SecAggSetup(1).to_record()})[A]

    # Assert
    assert "already sent its masked soft labels in round 1; a second masked answer" in refusal(again)
    assert "already sent its masked soft labels in round 1" in refusal(smaller)
    assert "it takes part in no round 1 again" in refusal(rekeyed)
    assert teacher_meta(coordinator.grid.states[A]) == trained  # refused before the teacher trained again
    assert_nothing_beyond_the_sum(coordinator)


def test_a_plain_query_in_a_secure_run_is_refused(coordinator: Coordinator) -> None:
    # Execute: the soft-label query without a roster: an answer in the clear
    reply = coordinator.send(SOFT_LABELS_TYPE, {A: coordinator.query.to_record()})[A]

    # Assert
    assert "under secure aggregation: a soft-label query without a roster" in refusal(reply)
    assert coordinator.masked_vectors() == {} and teacher_meta(coordinator.grid.states[A]) is None


# --- the roster: signed keys of allow-listed institutions only ----------------------------------------------------

def made_key() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def forged_keys(node: int, name: str, signer: Signer | None) -> SecAggKeys:
    """Round keys the coordinator made for `node`, under institution `name`, signed by `signer` (or unsigned)."""
    mask_key, share_key = made_key(), made_key()
    signature = signer.sign(keys_statement(RUN_ID, 1, node, name, mask_key, share_key)) if signer else ""
    return SecAggKeys(1, mask_key, share_key, name, signature)


@pytest.mark.parametrize(("forge", "message"), [
    (lambda node, name: forged_keys(node, name, None), "unsigned"),
    (lambda node, name: forged_keys(node, name, Signer.generate(name)), "bad signature"),  # impersonates the peer
    (lambda node, name: forged_keys(node, "coordinator", Signer.generate("coordinator")), "not on the allow-list"),
], ids=["unsigned", "signed-by-an-impostor", "signed-by-an-unlisted-key"])
def test_a_roster_whose_peers_are_keys_the_server_made_is_refused(coordinator: Coordinator,
                                                                  forge: Callable[[int, str], SecAggKeys], message: str) -> None:
    # Prepare: A's own keys, and for its two peers keys the coordinator made (it would hold their private halves)
    coordinator.honest_until("keys")
    keys = {A: coordinator.keys[A], **{n: forge(n, coordinator.keys[n].institution) for n in (B, C)}}
    roster = make_roster({n: (k.mask_key, k.share_key) for n, k in keys.items()},
                         {n: (k.institution, k.signature) for n, k in keys.items()})

    # Execute
    reply = coordinator.send(SHARES_TYPE, {A: coordinator.roster_message(roster).to_record()})[A]

    # Assert: no share of A's secrets left A; the coordinator holds A's public keys and a refusal
    assert "AuditError" in refusal(reply) and message in refusal(reply)
    assert coordinator.bundles_from(A) == 0
    assert [kind for node, kind, _ in coordinator.received if node == A] == [SETUP_TYPE, SHARES_TYPE]


def test_a_roster_with_a_small_order_key_is_refused(coordinator: Coordinator) -> None:
    # Prepare: a peer's genuinely signed entry with its mask key swapped for zero (every shared secret zero)
    coordinator.honest_until("keys")
    roster = {**coordinator.roster, B: dataclasses.replace(coordinator.roster[B], mask_key=bytes(32))}

    # Execute
    reply = coordinator.send(SHARES_TYPE, {A: coordinator.roster_message(roster).to_record()})[A]

    # Assert
    assert f"node {B}'s mask key in the roster is a point of small order" in refusal(reply)
    assert coordinator.bundles_from(A) == 0


def test_a_bundle_altered_in_relay_is_refused_and_frames_no_peer(coordinator: Coordinator) -> None:
    # Prepare: the coordinator flips a bit of B's bundle for A, hoping A accuses B (and B is dropped)
    coordinator.honest_until("shares")
    bundles = {s: coordinator.bundles[s].bundles[A] for s in NODES}
    bundles[B] = bundles[B][:-1] + bytes([bundles[B][-1] ^ 1])
    inbox = SecAggInbox(1, bundles, {s: coordinator.bundles[s].signatures[A] for s in NODES})

    # Execute
    reply = coordinator.send(INBOX_TYPE, {A: inbox.to_record()})[A]

    # Assert: B signed other bytes, so A refuses the whole inbox (the coordinator's doing) and accuses no one
    assert f"the bundle relayed from node {B}: signature of 'institution-1': bad signature" in refusal(reply)


# --- the threshold: pinned, and never below the floor -----------------------------------------------------------

def test_a_lowered_threshold_is_refused_before_any_share_leaves(coordinator: Coordinator) -> None:
    # Prepare / Execute: threshold 2 of 4 at the shares step
    coordinator.honest_until("keys")
    low = coordinator.send(SHARES_TYPE, {n: coordinator.roster_message(coordinator.roster, 2).to_record() for n in NODES})

    # Assert: refused by every node's site policy (the default floor), before any share left
    for node in NODES:
        assert refusal(low[node]).startswith("PolicyViolation: site-policy: min-secagg-threshold = 3 (more than half of "
                                             "the 4 institutions, at least 3) refuses a secure-aggregation threshold of 2")
    assert sum(coordinator.bundles_from(n) for n in NODES) == 0


def test_a_threshold_lowered_after_the_shares_is_refused(coordinator: Coordinator) -> None:
    # Prepare: shares given at threshold 3
    coordinator.honest_until("inbox")

    # Execute: the masked query with threshold 2, and the consistency step with two survivors
    lowered = coordinator.masked([A], coordinator.roster_message(coordinator.roster, 2))[A]
    coordinator.masked(NODES, coordinator.roster_message(coordinator.roster))
    two = coordinator.send(CONSISTENCY_TYPE, {A: SecAggConsistency(1, [A, B]).to_record()})[A]

    # Assert
    assert "the query's threshold 2 (weighted False) differs from the 3" in refusal(lowered)
    assert "at least the threshold (3)" in refusal(two)
    assert_nothing_beyond_the_sum(coordinator)


# --- the consistency step: one survivor set --------------------------------------------------------------------

def test_different_survivor_sets_shown_to_different_nodes_open_no_ones_input(coordinator: Coordinator) -> None:
    # Prepare: everyone masked; A, B and D are shown S1 = all four, C is shown S2 = without D (hoping for D's mask key)
    coordinator.honest_until("masked")
    s1, s2 = NODES, [A, B, C]
    signatures = coordinator.sign({A: s1, B: s1, D: s1, C: s2})

    # Execute: C is asked with the S2 it signed, with every signature the coordinator holds; then with S1
    with_s2 = coordinator.unmask(C, s2, signatures)
    with_s1 = coordinator.unmask(C, s1, {n: signatures[n] for n in (A, B, D)})
    honest = coordinator.unmask(A, s1, {n: signatures[n] for n in (A, B, D)})

    # Assert: C gives nothing (one valid signature on its sets), A answers for S1 only: self-seed shares, no mask key
    assert "1 survivors validly signed the survivor set this node signed; 3 must" in refusal(with_s2)
    assert "the survivor set differs from the one this node signed" in refusal(with_s1)
    answer = SecAggShares.from_record(honest.content, 1).shares
    assert {node: secret for node, (secret, _) in answer.items()} == dict.fromkeys(NODES, "b")
    assert not any(secret == "c" for _, secret in coordinator.shares_held())
    assert_nothing_beyond_the_sum(coordinator)


def test_a_node_signs_one_survivor_set_per_round(coordinator: Coordinator) -> None:
    # Prepare
    coordinator.honest_until("masked")
    coordinator.sign({A: NODES})

    # Execute
    second = coordinator.send(CONSISTENCY_TYPE, {A: SecAggConsistency(1, [A, B, C]).to_record()})[A]

    # Assert
    assert "already signed the survivor set of round 1; it signs one survivor set per round" in refusal(second)


# --- never both secrets of one node ------------------------------------------------------------------------------

def test_a_second_unmasking_request_for_the_other_secret_of_a_node_is_refused(coordinator: Coordinator) -> None:
    # Prepare: everyone masked and signed S = all four; A and B gave the self-seed shares of all four
    coordinator.honest_until("masked")
    signatures = coordinator.sign(dict.fromkeys(NODES, NODES))
    for node in (A, B):
        assert not coordinator.unmask(node, NODES, signatures).has_error()

    # Execute: D now said to have dropped, so its mask key's shares are asked: of A again, and of C (unsigned set)
    again = coordinator.unmask(A, [A, B, C], signatures)
    other = coordinator.unmask(C, [A, B, C], signatures)

    # Assert
    assert "this node is done with round 1" in refusal(again)
    assert "the survivor set differs from the one this node signed" in refusal(other)
    held = coordinator.shares_held()
    assert held.get((D, "b")) == {A, B} and (D, "c") not in held
    assert_nothing_beyond_the_sum(coordinator)


def test_an_unmasking_request_without_the_consistency_step_is_refused(coordinator: Coordinator) -> None:
    # Prepare
    coordinator.honest_until("masked")

    # Execute: shares asked straight after the masked answers, with no signatures
    reply = coordinator.unmask(A, NODES, {})

    # Assert
    assert "signed no survivor set in round 1; it gives no share before the consistency step" in refusal(reply)
    assert coordinator.shares_held() == {}
