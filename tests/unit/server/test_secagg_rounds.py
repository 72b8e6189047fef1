"""Unit tests of a secure-aggregation round: server/secure_rounds.py against the institutions' real steps.

The suite's in-memory Grid hands each message to the real client steps of client/secure.py, with one node state,
identity and allow-list per institution (tests/unit/secagg_fixtures.py); the server side (exchanges, roster, disputes,
sum, ledger) is the real one, with a real AuditTrail. Also here: the institution's node state (client/secure.py) and
the run-config rules of secure aggregation. A deviating coordinator is in tests/unit/client/test_hostile_secagg_server.py,
a faulty peer in test_secagg_faulty_peer.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, RecordDict

import server.secure_rounds as secure_rounds
from client.node_state import SECAGG_KEY as STATE_KEY
from client.secure import (
    masked_vector,
    node_credentials,
    open_inbox,
    round_keys,
    share_bundles,
    sign_survivors,
    unmask_shares,
)
from common.audit import kinds
from common.audit.ledger import OPENED
from common.audit.verify import verify_ledger
from common.config import RunConfig
from common.errors import AuditError, ConfigError, QuorumError
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
    SecAggShares,
    SecAggUnmask,
)
from common.node_config import NodeConfig
from common.secagg.masking import prg, quantise
from common.secagg.protocol import make_roster
from common.secagg.shamir import reconstruct
from server.audit_trail import LEDGER, AuditTrail
from server.secure_rounds import check_secure_run, secure_soft_labels

from audit_fixtures import witness_ledger_end
from secagg_fixtures import (
    CLASSES,
    FINGERPRINT,
    NODES,
    PROBS,
    RUN_ID,
    SAMPLES,
    WEIGHTS,
    Institutions,
    Sites,
    make_query,
    provision,
    secure_config,
)

pytestmark = pytest.mark.usefixtures("server_task")  # Flower builds a Message only inside a running task


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


@pytest.fixture
def sites(tmp_path: Path) -> Sites:
    return provision(tmp_path / "sites")


def open_trail(cfg: RunConfig, folder: Path) -> AuditTrail:
    return AuditTrail.open(cfg, folder, RUN_ID)


def mean_of(nodes: list[int], weights: dict[int, float] | None = None) -> np.ndarray:
    w = None if weights is None else [weights[n] for n in nodes]
    return np.average([PROBS[n].astype(np.float64) for n in nodes], axis=0, weights=w)


# --- the ensemble ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["mean", "weighted"])
def test_a_secure_round_returns_the_plain_ensemble(run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites, rule: str) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites, aggregation=rule)
    grid = Institutions(sites)

    # Execute
    probs, outcome = secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)

    # Assert
    expected = mean_of(NODES, WEIGHTS if rule == "weighted" else None)
    assert probs.shape == (SAMPLES, CLASSES) and probs.dtype == np.float32
    assert np.abs(probs - expected).max() < 1e-6
    assert sorted(outcome.accepted) == NODES and outcome.rejected == {}
    assert all(isinstance(reply, MaskedReply) for reply in outcome.accepted.values())
    assert set(outcome.uplink_bytes) == set(NODES) and outcome.downlink_bytes > 0


def test_weighted_and_plain_means_differ_for_unequal_weights(run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites) -> None:
    # Prepare: guards the test above against weights that happen not to matter
    cfg = secure_config(run_config_mapping, sites, aggregation="weighted")

    # Execute
    probs, _ = secure_soft_labels(Institutions(sites), cfg, open_trail(cfg, run_dir), make_query(), NODES)

    # Assert
    assert np.abs(probs - mean_of(NODES)).max() > 1e-3


@pytest.mark.parametrize(("failure", "check"), [("error", "node-error"), ("silent", "timeout")])
def test_a_node_failing_at_the_masked_step_is_dropped_and_the_others_sum_opens(
    run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites, failure: str, check: str,
) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites)
    gone = NODES[2]
    grid = Institutions(sites, failing={(gone, SOFT_LABELS_TYPE): failure})
    trail = open_trail(cfg, run_dir)

    # Execute
    probs, outcome = secure_soft_labels(grid, cfg, trail, make_query(), NODES)

    # Assert
    others = [n for n in NODES if n != gone]
    assert np.abs(probs - mean_of(others)).max() < 1e-6
    assert sorted(outcome.accepted) == others
    assert outcome.checks == {gone: check}
    assert grid.destinations(CONSISTENCY_TYPE) == others and grid.destinations(UNMASK_TYPE) == others
    unmask = SecAggUnmask.from_record(grid.sent_of(UNMASK_TYPE)[0].content)
    assert unmask.survivors == others and sorted(unmask.signatures) == others
    answers = [SecAggShares.from_record(record, 1).shares for _, kind, record in grid.received if kind == UNMASK_TYPE]
    assert all({n: k for n, (k, _) in a.items()} == {n: "c" if n == gone else "b" for n in NODES} for a in answers)
    rejected = [e["body"] for e in trail.ledger.entries() if e["kind"] == kinds.REPLY_REJECTED]
    assert [(b["phase"], b["node_id"], b["check"]) for b in rejected] == [("soft-labels", str(gone), check)]


def test_survivors_silent_at_unmask_still_count_while_threshold_answer(
    run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites,
) -> None:
    # Prepare: threshold 3 of 5 (a majority); two survivors give no shares
    cfg = secure_config(run_config_mapping, sites)
    grid = Institutions(sites, failing={(NODES[0], UNMASK_TYPE): "error", (NODES[4], UNMASK_TYPE): "silent"})

    # Execute
    probs, outcome = secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)

    # Assert
    assert np.abs(probs - mean_of(NODES)).max() < 1e-6  # their masked soft labels are in the sum
    assert sorted(outcome.rejected) == [NODES[0], NODES[4]]


@pytest.mark.parametrize(
    ("kind", "what"),
    [(SETUP_TYPE, "sent keys"), (SHARES_TYPE, "distributed their shares"), (INBOX_TYPE, "opened every other's shares"),
     (SOFT_LABELS_TYPE, "sent masked soft labels"), (CONSISTENCY_TYPE, "signed the survivor set"),
     (UNMASK_TYPE, "returned shares")],
    ids=["keys", "bundles", "inbox", "masked", "consistency", "unmask"],
)
def test_fewer_than_threshold_institutions_is_a_quorum_error(
    run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites, kind: str, what: str,
) -> None:
    # Prepare: min-clients 2, so the threshold is what stops the round
    cfg = secure_config(run_config_mapping, sites, min_clients=2, secagg_threshold=3)
    grid = Institutions(sites, failing={(node, kind): "error" for node in NODES[:3]})

    # Execute / Assert
    with pytest.raises(QuorumError, match=f"only 2 institutions {what}; secure aggregation needs 3 \\(threshold 3"):
        secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)


@pytest.mark.parametrize(("failing_keys", "threshold"), [(0, 3), (1, 3), (2, 3)])
def test_the_default_threshold_is_a_majority_of_those_that_sent_keys_and_at_least_3(
    run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites, failing_keys: int, threshold: int,
) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites, min_clients=2)
    grid = Institutions(sites, failing={(node, SETUP_TYPE): "error" for node in NODES[:failing_keys]})

    # Execute
    probs, _ = secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)

    # Assert
    roster = SecAggRoster.from_record(grid.sent_of(SHARES_TYPE)[0].content)
    assert (len(roster.roster), roster.threshold) == (len(NODES) - failing_keys, threshold)
    assert np.abs(probs - mean_of(NODES[failing_keys:])).max() < 1e-6


def test_the_configured_threshold_is_the_one_used(run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites, min_clients=2, secagg_threshold=5)
    grid = Institutions(sites, failing={(NODES[1], SOFT_LABELS_TYPE): "error"})

    # Execute / Assert
    with pytest.raises(QuorumError, match=r"only 4 institutions sent masked soft labels; .* \(threshold 5"):
        secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)
    roster = SecAggRoster.from_record(grid.sent_of(SHARES_TYPE)[0].content)
    assert roster.threshold == 5


# --- what the server holds -------------------------------------------------------------------------------------

def arrays_in(record: RecordDict) -> Iterator[np.ndarray]:
    for value in record.values():
        if isinstance(value, ArrayRecord):
            yield from (array.numpy() for array in value.values())


def raw_bytes(record: RecordDict) -> bytes:
    """Every array's data and every bytes value of a record, end to end."""
    parts = [array.data for value in record.values() if isinstance(value, ArrayRecord) for array in value.values()]
    parts += [v for value in record.values() if not isinstance(value, ArrayRecord) for v in value.values()
              if isinstance(v, bytes)]
    return b"|".join(parts)


def plaintext_in(record: RecordDict, plain: dict[int, np.ndarray]) -> list[str]:
    """What of any institution's plaintext the record holds: its soft labels, w * soft labels, w, their
    quantised form, as arrays (exactly or to 1e-3), or anywhere in its bytes; and any non-uint64 array."""
    findings = [f"a {array.dtype} array" for array in arrays_in(record) if array.dtype != np.uint64]
    everything = raw_bytes(record)
    for node, vector in plain.items():
        quantised = quantise(vector)
        secrets = {"probs": PROBS[node], "w * probs and w": vector, "w * probs": vector[:-1]}
        for array in (a.reshape(-1) for a in arrays_in(record)):
            findings += [f"{name} of node {node}" for name, secret in secrets.items() if array.size == secret.size
                         and np.allclose(array.astype(np.float64), secret.reshape(-1), atol=1e-3)]
            if array.shape == quantised.shape and np.any(array == quantised):
                findings.append(f"entries of quantised input of node {node}")
        for name, data in {"probs": PROBS[node].tobytes(), "quantised": quantised.tobytes(),
                           "quantised w * probs": quantised[:-1].tobytes()}.items():
            if data in everything:
                findings.append(f"{name} bytes of node {node}")
    return findings


def rebuilt_self_seed(grid: Institutions, node: int) -> bytes:
    """A survivor's self seed b, rebuilt from the b-shares the server received (as server_sum does)."""
    roster = SecAggRoster.from_record(grid.sent_of(SHARES_TYPE)[0].content).roster
    shares = {roster[responder].index: SecAggShares.from_record(record, 1).shares[node][1]
              for responder, kind, record in grid.received if kind == UNMASK_TYPE}
    return reconstruct(shares, 3)


def test_the_server_only_ever_holds_masked_vectors_and_opens_only_the_sum(
    run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites, aggregation="weighted")
    grid = Institutions(sites)
    opened: list[np.ndarray] = []
    dequantise = secure_rounds.dequantise
    monkeypatch.setattr(secure_rounds, "dequantise", lambda values: opened.append(values.copy()) or dequantise(values))
    plain = {n: np.concatenate([WEIGHTS[n] * PROBS[n].astype(np.float64).reshape(-1), [WEIGHTS[n]],
                                PROBS[n].astype(np.float64).reshape(-1)]) for n in NODES}  # weighted: the plain rows too

    # Execute
    probs, outcome = secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)

    # Assert
    assert len(grid.received) == 6 * len(NODES)
    for node, kind, record in grid.received:
        assert plaintext_in(record, plain) == [], (node, kind)
    for node, reply in outcome.accepted.items():
        assert plaintext_in(reply.to_record(), plain) == [], node
        without_self_mask = reply.masked - prg(rebuilt_self_seed(grid, node), reply.masked.size)  # all the server can do
        assert not np.any(without_self_mask == quantise(plain[node])), node
    assert len(opened) == 1  # one vector is ever opened: the sum
    assert np.array_equal(opened[0], np.sum([quantise(v) for v in plain.values()], axis=0, dtype=np.uint64))
    assert np.abs(probs - mean_of(NODES, WEIGHTS)).max() < 1e-6


def test_private_keys_and_self_seed_stay_in_node_state(run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites)
    kept: dict[int, list[bytes]] = {}

    def remember_secrets(node: int, kind: str, content: RecordDict) -> RecordDict:
        record = grid.states[node].get(STATE_KEY)
        if record is not None:
            kept.setdefault(node, []).extend(v for v in record.values() if isinstance(v, bytes))
        return content

    grid = Institutions(sites, tamper=remember_secrets)

    # Execute
    secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)

    # Assert
    assert all(len(set(secrets)) == 3 for secrets in kept.values())  # mask key, share key, self seed
    assert set(kept) == set(NODES)
    for _, _, record in grid.received:
        everything = raw_bytes(record)
        assert not any(secret in everything for secrets in kept.values() for secret in secrets)
    assert all(STATE_KEY not in state for state in grid.states.values())  # forgotten once the shares were given


# --- the ledger ------------------------------------------------------------------------------------------------

def test_the_ledger_records_every_phase_and_verifies(run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites)
    trail = open_trail(cfg, run_dir)
    grid = Institutions(sites, failing={(NODES[3], SOFT_LABELS_TYPE): "error"})
    student = run_dir / "student.safetensors"
    student.write_bytes(b"student weights after round 1")

    # Execute
    probs, outcome = secure_soft_labels(grid, cfg, trail, make_query(), NODES)
    trail.aggregated(1, cfg.aggregation, sorted(outcome.accepted), probs, SAMPLES)
    trail.checkpoint(1, student, 0.5)
    trail.finished(1, student)

    # Assert
    entries = trail.ledger.entries()
    steps = [(e["kind"], e["body"].get("phase")) for e in entries if e["kind"] not in (kinds.TREE_HEAD, kinds.COSIGNED)]
    assert sum(e["kind"] == kinds.TREE_HEAD for e in entries) == 6  # every exchange was witnessed
    survivors = [n for n in NODES if n != NODES[3]]
    assert steps == (
        [(OPENED, None), (kinds.RUN_STARTED, None)]
        + [(kinds.EXCHANGE_OPENED, "secagg-keys")] + [(kinds.REPLY_ACCEPTED, "secagg-keys")] * 5
        + [(kinds.EXCHANGE_OPENED, "secagg-bundles")] + [(kinds.REPLY_ACCEPTED, "secagg-bundles")] * 5
        + [(kinds.EXCHANGE_OPENED, "secagg-inbox")] + [(kinds.REPLY_ACCEPTED, "secagg-inbox")] * 5
        + [(kinds.ROUND_OPENED, None)] + [(kinds.REPLY_ACCEPTED, "soft-labels")] * 4
        + [(kinds.REPLY_REJECTED, "soft-labels")]
        + [(kinds.EXCHANGE_OPENED, "secagg-consistency")] + [(kinds.REPLY_ACCEPTED, "secagg-consistency")] * 4
        + [(kinds.EXCHANGE_OPENED, "secagg-shares")] + [(kinds.REPLY_ACCEPTED, "secagg-shares")] * 4
        + [(kinds.AGGREGATED, None), (kinds.CHECKPOINT, None), (kinds.RUN_FINISHED, None)]
    )
    shares_opened = next(e["body"] for e in entries if e["body"].get("phase") == "secagg-shares")
    assert shares_opened["nodes"] == [str(n) for n in survivors]
    assert isinstance(shares_opened["query_sha256"], str)  # every survivor got the same signatures
    inbox_opened = next(e["body"] for e in entries if e["body"].get("phase") == "secagg-inbox")
    assert isinstance(inbox_opened["query_sha256"], dict)  # each member got its own bundles
    round_opened = next(e["body"] for e in entries if e["kind"] == kinds.ROUND_OPENED)
    assert round_opened["nodes"] == [str(n) for n in NODES]
    witness_ledger_end(trail.ledger, {n: sites.identities[n] for n in survivors}, trail.witnessing)
    result = verify_ledger(run_dir / LEDGER)
    assert result.problems == [], "\n".join(map(str, result.problems))


def test_a_masked_weight_of_2_to_the_52_gets_the_weighted_sum_refused_and_the_round_goes_on_unweighted(
        run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites) -> None:
    # Prepare: the liar knows its own masks, so it adds [2^52 p, 2^52] - [w p, w] (fixed point, mod 2^64) to the
    # weighted part of its honest masked vector; 2^52 * 2^24 wraps in the 64-bit field, so the opened rows are garbage
    cfg = secure_config(run_config_mapping, sites, aggregation="weighted")
    trail = open_trail(cfg, run_dir)
    liar, lie, cells = NODES[2], 2**52, SAMPLES * CLASSES
    honest = np.concatenate([WEIGHTS[liar] * PROBS[liar].astype(np.float64).reshape(-1), [WEIGHTS[liar]]])
    lying = [int(lie * float(p)) * (1 << 24) % 2**64 for p in PROBS[liar].reshape(-1)] + [lie * (1 << 24) % 2**64]
    delta = np.concatenate([np.asarray(lying, dtype=np.uint64) - quantise(honest),  # uint64 arithmetic wraps mod 2^64
                            np.zeros(cells, dtype=np.uint64)])

    def inflate(node: int, kind: str, content: RecordDict) -> RecordDict:
        if node != liar or kind != SOFT_LABELS_TYPE:
            return content
        reply = MaskedReply.from_record(content, 1, FINGERPRINT, 2 * cells + 1)
        return dataclasses.replace(reply, masked=reply.masked + delta).to_record()

    # Execute
    probs, outcome = secure_soft_labels(Institutions(sites, lie=inflate), cfg, trail, make_query(), NODES)

    # Assert: the weighted sum refused as a whole (no institution can be singled out) and recorded; the round's
    # aggregate is the plain mean of every institution's rows, which no declared weight tilts
    [refused] = [e["body"] for e in trail.ledger.entries() if e["kind"] == kinds.SUM_REFUSED]
    assert refused["round"] == 1 and refused["check"] == "weight-range"
    assert "not rows on the simplex" in refused["reason"] and "uses the unweighted sum instead" in refused["reason"]
    assert sorted(outcome.accepted) == sorted(NODES)
    assert np.abs(probs - mean_of(NODES)).max() < 1e-6


def test_a_bundle_altered_in_transit_drops_only_its_sender_and_the_round_goes_on(
    run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites,
) -> None:
    # Prepare: the bundle NODES[0] sealed for NODES[1] is altered after NODES[0] signed its reply
    cfg = secure_config(run_config_mapping, sites)
    source, reader = NODES[0], NODES[1]

    def alter(node: int, kind: str, content: RecordDict) -> RecordDict:
        if (node, kind) != (source, SHARES_TYPE):
            return content
        flipped = content["bundles"][str(reader)][:-1] + bytes([content["bundles"][str(reader)][-1] ^ 1])  # GCM tag
        content["bundles"][str(reader)] = flipped
        return content

    grid = Institutions(sites, tamper=alter)
    trail = open_trail(cfg, run_dir)

    # Execute
    probs, outcome = secure_soft_labels(grid, cfg, trail, make_query(), NODES)

    # Assert: the attestation no longer matches: the sender's bundles are refused, and no one masks with it
    others = [n for n in NODES if n != source]
    assert np.abs(probs - mean_of(others)).max() < 1e-6
    assert outcome.checks == {source: "digest"}
    assert grid.destinations(INBOX_TYPE) == others and grid.destinations(SOFT_LABELS_TYPE) == others
    rejected = [e["body"] for e in trail.ledger.entries() if e["kind"] == kinds.REPLY_REJECTED]
    assert [(b["phase"], b["node_id"], b["check"]) for b in rejected] == [("secagg-bundles", str(source), "digest")]


# --- altered shares ------------------------------------------------------------------------------------------------

FORGED = int.from_bytes(b"\x01" + b"\x07" * 65, "big")  # every share equal: the polynomial is this constant


def forge_shares(target: int, kind: str) -> Callable[[int, str, RecordDict], RecordDict]:
    """A lie: every unmasking answer gives FORGED as its `kind` share of node `target` (and signs it)."""

    def tamper(node: int, message_type: str, content: RecordDict) -> RecordDict:
        if message_type != UNMASK_TYPE:
            return content
        shares = SecAggShares.from_record(content, 1).shares
        return SecAggShares(1, {**shares, target: (kind, FORGED)}).to_record()

    return tamper


def test_self_mask_shares_forged_by_every_responder_end_the_round_with_a_quorum_error(
    run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites,
) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites)
    grid = Institutions(sites, lie=forge_shares(NODES[0], "b"))

    # Execute / Assert
    with pytest.raises(QuorumError, match="secure aggregation could not open the sum"):
        secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)


def test_mask_key_shares_forged_by_every_responder_end_the_round_with_a_quorum_error(
    run_dir: Path, run_config_mapping: dict[str, Any], sites: Sites,
) -> None:
    # Prepare
    cfg = secure_config(run_config_mapping, sites)
    dropped = NODES[2]
    grid = Institutions(sites, failing={(dropped, SOFT_LABELS_TYPE): "error"}, lie=forge_shares(dropped, "c"))

    # Execute / Assert
    with pytest.raises(QuorumError, match="secure aggregation could not open the sum"):
        secure_soft_labels(grid, cfg, open_trail(cfg, run_dir), make_query(), NODES)


# --- the institution's node state (client/secure.py) ------------------------------------------------------------

THREE = NODES[:3]


def keys_and_roster(sites: Sites, nodes: list[int] = THREE) -> tuple[dict[int, RecordDict], SecAggRoster]:
    """Step 1 for `nodes`, and the roster the server would publish (threshold 3: all of them)."""
    states = {node: RecordDict() for node in nodes}
    keys = {node: round_keys(states[node], RUN_ID, node, sites.credentials(node), 1) for node in nodes}
    roster = make_roster({n: (k.mask_key, k.share_key) for n, k in keys.items()},
                         {n: (k.institution, k.signature) for n, k in keys.items()})
    return states, SecAggRoster(1, 3, False, roster)


def through_consistency(sites: Sites) -> tuple[dict[int, RecordDict], dict[int, str]]:
    """Steps 1 to 5 for three nodes, honestly: their states, and their signatures of the survivor set (all three)."""
    states, request = keys_and_roster(sites)
    bundles = {n: share_bundles(states[n], RUN_ID, n, sites.credentials(n), request) for n in THREE}
    for n in THREE:
        inbox = SecAggInbox(1, {s: bundles[s].bundles[n] for s in THREE}, {s: bundles[s].signatures[n] for s in THREE})
        assert open_inbox(states[n], RUN_ID, n, sites.credentials(n), inbox).accused == []
        masked_vector(states[n], RUN_ID, n, request, PROBS[n], 1.0)
    signatures = {n: sign_survivors(states[n], RUN_ID, n, sites.credentials(n), SecAggConsistency(1, THREE)).signature
                  for n in THREE}
    return states, signatures


def test_round_keys_send_only_public_halves_signed(sites: Sites) -> None:
    # Prepare
    state = RecordDict()

    # Execute
    keys = round_keys(state, RUN_ID, NODES[0], sites.credentials(NODES[0]), 4)

    # Assert
    secrets = state[STATE_KEY]
    assert secrets["round"] == 4
    sent = keys.to_record()["secagg-keys"]
    assert {secrets["mask-private"], secrets["share-private"]}.isdisjoint({sent["mask-key"], sent["share-key"]})
    assert sent["institution"] == "institution-0" and sent["signature"]


def test_a_roster_that_substitutes_this_nodes_keys_is_refused(sites: Sites) -> None:
    # Prepare
    states, request = keys_and_roster(sites)
    node = NODES[0]
    entry = request.roster[node]
    swapped = SecAggRoster(1, 3, False, {**request.roster, node: dataclasses.replace(entry, mask_key=entry.share_key,
                                                                                     share_key=entry.mask_key)})

    # Execute / Assert
    with pytest.raises(AuditError, match="the roster does not hold this node's keys"):
        share_bundles(states[node], RUN_ID, node, sites.credentials(node), swapped)


def test_a_node_that_gave_no_shares_sends_no_masked_vector(sites: Sites) -> None:
    # Prepare
    states, request = keys_and_roster(sites)

    # Execute / Assert
    with pytest.raises(AuditError, match="this node gave no shares in round 1"):
        masked_vector(states[NODES[0]], RUN_ID, NODES[0], request, PROBS[NODES[0]], 1.0)


def test_a_node_without_this_rounds_keys_takes_no_step(sites: Sites) -> None:
    # Prepare
    states, request = keys_and_roster(sites)
    later = SecAggRoster(2, 3, False, request.roster)

    # Execute / Assert
    with pytest.raises(AuditError, match="no keys for round 2"):
        share_bundles(states[NODES[0]], RUN_ID, NODES[0], sites.credentials(NODES[0]), later)
    with pytest.raises(AuditError, match="no keys for round 1"):
        share_bundles(RecordDict(), RUN_ID, NODES[0], sites.credentials(NODES[0]), request)


def test_a_node_gives_its_shares_once_then_forgets_the_round(sites: Sites) -> None:
    # Prepare: a second request could ask for the other share of a client (b first, then c)
    states, signatures = through_consistency(sites)
    me = THREE[0]
    first = SecAggUnmask(1, THREE, signatures)
    second = SecAggUnmask(1, THREE[:2], signatures)

    # Execute
    shares = unmask_shares(states[me], RUN_ID, me, sites.credentials(me), first)

    # Assert
    assert {node: kind for node, (kind, _) in shares.shares.items()} == {node: "b" for node in THREE}
    assert STATE_KEY not in states[me]
    with pytest.raises(AuditError, match="this node is done with round 1"):
        unmask_shares(states[me], RUN_ID, me, sites.credentials(me), second)
    with pytest.raises(AuditError, match="sent its masked soft labels in round 1 of this run; it takes part in no round 1"):
        round_keys(states[me], RUN_ID, me, sites.credentials(me), 1)  # nor can the round be keyed afresh


def test_a_node_without_its_own_identity_or_allow_list_refuses_secure_aggregation(
        tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare: a node config without institution-id / signing-key, in a run without sites
    cfg = RunConfig.from_run_config({**run_config_mapping, "sites-dir": ""})

    # Execute / Assert
    with pytest.raises(ConfigError, match="secure aggregation needs this node's signing identity .* and its own copy of "
                                          "the consortium's allow-list"):
        node_credentials(cfg, NodeConfig.from_node_config({"partition-id": 0}))


# --- the run config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["confidence", "median", "trimmed-mean", "era", "expertise", "balanced-expertise",
                                  "inferred-expertise", "selective"])
def test_rules_that_need_each_institutions_rows_are_refused(run_config_mapping: dict[str, Any], sites: Sites, rule: str) -> None:
    message = f"aggregation '{rule}' needs each institution's soft labels.*use 'mean' or 'weighted'"
    with pytest.raises(ConfigError, match=message):
        secure_config(run_config_mapping, sites, aggregation=rule)


def test_without_secure_aggregation_every_rule_is_allowed(run_config_mapping: dict[str, Any], sites: Sites) -> None:
    # Execute
    cfg = secure_config(run_config_mapping, sites, aggregation="median", secure_aggregation=False)

    # Assert
    assert cfg.aggregation == "median" and not cfg.secure_aggregation


def test_fedavg_with_secure_aggregation_is_refused(run_config_mapping: dict[str, Any], sites: Sites) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="FedAvg baseline \\(method 'fedavg'\\) does not use it"):
        secure_config(run_config_mapping, sites, method="fedavg")


@pytest.mark.parametrize(("clients", "minimum"), [(2, 2), (1, 1), (5, 1)])
def test_secure_aggregation_needs_three_clients_and_two_replies(
    run_config_mapping: dict[str, Any], sites: Sites, clients: int, minimum: int,
) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="secure aggregation needs num-clients >= 3 and min-clients >= 2"):
        secure_config(run_config_mapping, sites, num_clients=clients, min_clients=minimum)


@pytest.mark.parametrize("threshold", [1, -1, 2, len(NODES) + 1])
def test_a_threshold_out_of_range_is_refused(run_config_mapping: dict[str, Any], sites: Sites, threshold: int) -> None:
    # Execute / Assert: every node refuses less than more than half of the institutions (3 of 5)
    with pytest.raises(ConfigError, match=f"secagg-threshold must be 0 .* or in \\[3, num-clients=5\\] .*, got {threshold}"):
        secure_config(run_config_mapping, sites, secagg_threshold=threshold)


@pytest.mark.parametrize("threshold", [0, 3, len(NODES)])
def test_thresholds_in_range_are_accepted(run_config_mapping: dict[str, Any], sites: Sites, threshold: int) -> None:
    # Execute
    cfg = secure_config(run_config_mapping, sites, secagg_threshold=threshold)

    # Assert
    assert cfg.secagg_threshold == threshold


def test_the_server_refuses_a_secure_run_without_an_allow_list(run_config_mapping: dict[str, Any], sites: Sites) -> None:
    # Prepare: valid as a run config (fedstill simulate provisions the allow-list after checking it)
    cfg = secure_config(run_config_mapping, sites, allow_list="")

    # Execute / Assert
    check_secure_run(secure_config(run_config_mapping, sites))
    with pytest.raises(ConfigError, match="secure aggregation needs allow-list: every institution signs its round keys"):
        check_secure_run(cfg)
