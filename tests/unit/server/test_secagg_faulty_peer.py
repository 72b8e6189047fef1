"""A faulty peer under secure aggregation: one of four institutions sends an all-zero key, share bundles that do not
open, wrong shares, a bad survivor signature, or false complaints — each signed with its own key, so every check of
authenticity passes. The round completes with the honest institutions and the ledger names the faulty one.

The real server round (server/secure_rounds.py, with a real AuditTrail) runs against the real ClientApp handlers of four
provisioned institutions (the suite's in-memory Grid delivers the messages); the faulty node's reply is its real one,
altered, then re-signed (round keys, bundles, attestation) and logged under its own key, as a faulty node would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.secure
from client import client_app
from client.release import RELEASE_LOG, Identity, sign_and_log, simulated_institution, site_folder
from common.audit import kinds
from common.audit.keys import load_signer, private_key_path
from common.audit.verify import verify_ledger
from common.audit.witness import Cosignature
from common.config import RunConfig, default_run_config
from common.messages import (
    CONSISTENCY_TYPE,
    INBOX_TYPE,
    SETUP_TYPE,
    SHARES_TYPE,
    UNMASK_TYPE,
    SecAggComplaints,
    SecAggKeys,
    SecAggShares,
    SecAggSignature,
    attach_cosignature,
    read_cosignature,
)
from common.secagg.shamir import PRIME
from common.secagg.signatures import bundle_statement, keys_statement
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint
from server.audit_trail import LEDGER, AuditTrail
from server.rounds import make_query, witness_end
from server.secure_checks import settle_disputes
from server.secure_rounds import secure_soft_labels
from simulations.provision import provision_sites

from grid import MemoryGrid

NODES = [31, 32, 33, 34]
FAULTY = 34  # institution-3
HONEST = NODES[:3]
RUN_ID = 11
HANDLERS: dict[str, Callable[[Message, Context], Message]] = client_app.HANDLERS
RELEASE_KINDS = {SETUP_TYPE: "secagg-keys", SHARES_TYPE: "secagg-bundles", INBOX_TYPE: "secagg-complaints",
                 CONSISTENCY_TYPE: "secagg-signature", UNMASK_TYPE: "secagg-shares"}
Fault = Callable[[RecordDict, RecordDict, Identity], RecordDict]  # (reply content, query content, identity) -> lie

pytestmark = pytest.mark.usefixtures("server_task")


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    with torch.random.fork_rng():
        yield


class Federation(MemoryGrid):
    """Each message goes to the real ClientApp handler of its node; the faulty node's replies of `faults` types are
    altered and signed again with its own key."""

    def __init__(self, mapping: dict[str, Any], faults: dict[str, Fault]) -> None:
        super().__init__(nodes=NODES)
        self.mapping, self.faults = mapping, faults
        self.states = {node: RecordDict() for node in NODES}
        folder = site_folder(mapping["sites-dir"], NODES.index(FAULTY))
        name = simulated_institution(NODES.index(FAULTY))
        self.faulty = Identity(load_signer(private_key_path(folder, name), name), folder / RELEASE_LOG)
        cfg = RunConfig.from_run_config(mapping)
        self.fingerprint = public_fingerprint(load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed).public)

    def answer(self, message: Message) -> Message:
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        context = Context(RUN_ID, node, {"partition-id": NODES.index(node), "num-partitions": len(NODES)},
                          self.states[node], self.mapping)
        reply = HANDLERS[kind](message, context)
        if node != FAULTY or kind not in self.faults or reply.has_error():
            return reply
        lie = self.faults[kind](reply.content, message.content, self.faulty)
        cosigned = read_cosignature(reply.content)  # the liar witnesses the ledger like everyone else
        if cosigned is not None:
            lie = attach_cosignature(lie, Cosignature.from_dict(cosigned, "cosignature"))
        record = sign_and_log(self.faulty, lie, message.content, run_id=RUN_ID, round_=1, node_id=node,
                              fingerprint=self.fingerprint, kind=RELEASE_KINDS[kind])
        return Message(record, reply_to=message)


# --- the faults, each signed by the faulty institution ----------------------------------------------------------

def zero_key(content: RecordDict, query: RecordDict, me: Identity) -> RecordDict:
    """An all-zero mask key (a point of small order: every shared secret with it is zero), validly signed."""
    keys = SecAggKeys.from_record(content, 1)
    statement = keys_statement(RUN_ID, 1, FAULTY, me.signer.name, bytes(32), keys.share_key)
    return SecAggKeys(1, bytes(32), keys.share_key, me.signer.name, me.signer.sign(statement)).to_record()


def garbage_bundles(content: RecordDict, query: RecordDict, me: Identity) -> RecordDict:
    """Every bundle replaced by random bytes, each validly signed: only its addressee can tell."""
    bundles = {str(node): os.urandom(len(bundle)) for node, bundle in content["bundles"].items()}
    content["bundles"] = ConfigRecord(bundles)
    content["bundle-signatures"] = ConfigRecord({node: me.signer.sign(bundle_statement(RUN_ID, 1, FAULTY, int(node), bundle))
                                                 for node, bundle in bundles.items()})
    return content


def wrong_shares(content: RecordDict, query: RecordDict, me: Identity) -> RecordDict:
    """Every share returned at unmasking moved off its polynomial."""
    shares = SecAggShares.from_record(content, 1).shares
    return SecAggShares(1, {node: (kind, (value + 1) % PRIME) for node, (kind, value) in shares.items()}).to_record()


def bad_signature(content: RecordDict, query: RecordDict, me: Identity) -> RecordDict:
    """The survivor set 'signed' with a signature of something else."""
    return SecAggSignature(1, me.signer.sign(b"not the survivor set")).to_record()


def accuse(*accused: int) -> Fault:
    """Complaints against honest peers whose bundles opened."""
    def fault(content: RecordDict, query: RecordDict, me: Identity) -> RecordDict:
        return SecAggComplaints(1, list(accused)).to_record()
    return fault


# --- the round -------------------------------------------------------------------------------------------------

def run_round(tmp_path: Path, faults: dict[str, Fault], monkeypatch: pytest.MonkeyPatch
              ) -> tuple[np.ndarray, Any, list[dict[str, Any]], dict[int, np.ndarray]]:
    """One secure round of the four: the ensemble, the masked-answer exchange, the ledger, and each node's plain
    vector [w * probs, w] as it went into its mask (to check the opened sum)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mapping = {**default_run_config(), "dataset": "digits", "public-size": 120, "num-clients": len(NODES), "min-clients": 3,
               "partitioner": "iid", "num-server-rounds": 1, "teacher-models": "mlp", "local-epochs": 1, "teacher-batch-size": 512,
               "secure-aggregation": True, "aggregation": "mean", **provision_sites(run_dir, len(NODES))}
    cfg = RunConfig.from_run_config(mapping)
    grid = Federation(mapping, faults)
    plain: dict[int, np.ndarray] = {}
    mask = client.secure.client_masked_input

    def recording(node: int, *args: Any) -> np.ndarray:
        plain[node] = args[3]
        return mask(node, *args)

    monkeypatch.setattr(client.secure, "client_masked_input", recording)
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed)
    query = make_query(cfg, 1, public_fingerprint(split.public), len(split.public), split.public.num_classes)
    trail = AuditTrail.open(cfg, run_dir, RUN_ID)
    probs, outcome = secure_soft_labels(grid, cfg, trail, query, NODES)
    trail.aggregated(1, cfg.aggregation, sorted(outcome.accepted), probs, len(query.sample_ids))
    student = run_dir / "student.safetensors"
    student.write_bytes(b"student weights after round 1")
    trail.finished(1, student)
    witness_end(grid, cfg, trail, query.fingerprint, 1)
    ledger = [json.loads(line) for line in (run_dir / LEDGER).read_text().splitlines()]
    return probs, outcome, ledger, plain


def mean_of(plain: dict[int, np.ndarray], nodes: list[int], shape: tuple[int, int]) -> np.ndarray:
    total = np.sum([plain[n] for n in nodes], axis=0)
    return (total[:-1] / total[-1]).reshape(shape)


def blamed(ledger: list[dict[str, Any]]) -> list[tuple[str, str, str, str | None, str]]:
    """(kind, phase, node, institution, check) of every rejection and drop in the ledger."""
    return [(e["kind"], e["body"]["phase"], e["body"]["node_id"], e["body"]["institution_id"], e["body"]["check"])
            for e in ledger if e["kind"] in (kinds.REPLY_REJECTED, kinds.SECAGG_DROPPED)]


@pytest.mark.parametrize(("faults", "entry", "reason", "in_sum"), [
    ({SETUP_TYPE: zero_key}, (kinds.REPLY_REJECTED, "secagg-keys", "secagg-key"),
     "its mask key is a point of small order", HONEST),
    ({SHARES_TYPE: garbage_bundles}, (kinds.SECAGG_DROPPED, "secagg-inbox", "secagg-dispute"),
     f"nodes {HONEST} could not open the share bundles it signed for them", HONEST),
    ({INBOX_TYPE: accuse(*HONEST[:2])}, (kinds.SECAGG_DROPPED, "secagg-inbox", "secagg-dispute"),
     f"it could not open the signed bundles of nodes {HONEST[:2]}", HONEST),
    ({CONSISTENCY_TYPE: bad_signature}, (kinds.REPLY_REJECTED, "secagg-consistency", "secagg-signature"),
     "its signature of the survivor set: signature of 'institution-3': bad signature", NODES),
    ({UNMASK_TYPE: wrong_shares}, (kinds.SECAGG_DROPPED, "secagg-shares", "secagg-share"),
     f"the shares it returned for nodes {NODES} are not on their polynomials", NODES),
], ids=["all-zero-key", "bundles-that-do-not-open", "false-complaints", "bad-survivor-signature", "wrong-shares"])
def test_a_faulty_peer_is_dropped_and_named_and_the_round_completes_with_the_honest_institutions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faults: dict[str, Fault],
        entry: tuple[str, str, str], reason: str, in_sum: list[int]) -> None:
    # Execute
    probs, outcome, ledger, plain = run_round(tmp_path, faults, monkeypatch)

    # Assert: only the faulty institution is blamed, saying what it did
    kind, phase, check = entry
    assert blamed(ledger) == [(kind, phase, str(FAULTY), "institution-3", check)]
    assert reason in next(e["body"]["reason"] for e in ledger if e["kind"] == kind)
    # Assert: the sum opened is exactly the inputs of `in_sum` (a faulty node whose masked answer was valid
    # is in it: its input was committed before its fault), and nothing was refused
    assert sorted(outcome.accepted) == in_sum
    assert np.abs(probs - mean_of(plain, in_sum, probs.shape)).max() < 1e-5
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [e["kind"] for e in ledger].count(kinds.SUM_REFUSED) == 0
    # Assert: the ledger verifies, with the honest institutions' release logs; their signed replies are in it
    logs = [site_folder(tmp_path / "run" / "sites", NODES.index(n)) / RELEASE_LOG for n in HONEST]
    verified = verify_ledger(tmp_path / "run" / LEDGER, client_logs=logs)
    assert verified.problems == [], "\n".join(map(str, verified.problems))


def test_a_false_complaint_against_a_single_peer_costs_that_peer_the_round_and_is_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute: the faulty node accuses one honest peer only (the residual risk the docs state)
    probs, outcome, ledger, plain = run_round(tmp_path, {INBOX_TYPE: accuse(HONEST[0])}, monkeypatch)

    # Assert: that peer is dropped, the accuser's signed complaint stays in the ledger, and the round completes
    assert blamed(ledger) == [(kinds.SECAGG_DROPPED, "secagg-inbox", str(HONEST[0]), "institution-0", "secagg-dispute")]
    assert sorted(outcome.accepted) == [*HONEST[1:], FAULTY]
    complaint = next(e["body"] for e in ledger if e["kind"] == kinds.REPLY_ACCEPTED and e["body"]["phase"] == "secagg-inbox"
                     and e["body"]["node_id"] == str(FAULTY))
    assert complaint["institution_id"] == "institution-3"
    assert np.abs(probs - mean_of(plain, [*HONEST[1:], FAULTY], probs.shape)).max() < 1e-5



@pytest.mark.parametrize(("complaints", "dropped"), [
    ({}, []),
    ({31: [34], 32: [34], 33: [34], 34: [34]}, [34]),  # bundles that open for no one, not even their sender
    ({31: [34]}, [34]),  # one dispute: the accused, whose signed bundle is the evidence
    ({34: [31]}, [31]),
    ({34: [31, 32]}, [34]),  # a node accusing two peers whose bundles opened for everyone else
    ({31: [34], 34: [31, 32, 33]}, [34]),
    ({33: [34], 34: [32], 32: [33]}, [32, 34]),  # a cycle: two of its nodes cover it (ties: the smallest id, then the accused)
], ids=["none", "faulty-sender", "one-accused", "one-false-accusation", "two-false-accusations", "both-ways", "cycle"])
def test_disputes_are_settled_by_dropping_the_node_in_the_most_until_none_is_left(
        complaints: dict[int, list[int]], dropped: list[int]) -> None:
    # Execute
    settled = settle_disputes(complaints)

    # Assert: the expected nodes, and no dispute left among the others
    assert settled == dropped
    assert not [(a, b) for a, accused in complaints.items() for b in accused if a not in settled and b not in settled]
