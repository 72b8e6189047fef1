"""The institution's side of secure aggregation: signed round keys, signed share bundles, the inbox, the masked answer,
the survivor set's signature, the unmasking shares — each step checked against what the earlier ones pinned.

The coordinator may deviate (docs/threat-model.md), so the node trusts nothing a later message says about the round
that an earlier one fixed: the roster (every key signed by an institution on the node's *own* allow-list), the
threshold (at least a majority of the roster, and the site policy's floor) and the weighting are pinned when the node
gives its shares; the set U it masks with must be a subset of that roster whose shares it opened; it masks once per
round; it signs one survivor set S, and gives shares only for that S, once it holds a threshold of valid signatures
on the same (U, S). The round's private keys, self seed and opened shares live in node state
(client.node_state.SecAggRound) and are deleted once the shares are given; they never leave the node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from client.node_state import (
    SecAggRound,
    forget_secagg,
    keep_secagg_answered,
    keep_secagg_round,
    secagg_answered,
    secagg_round,
)
from client.release import load_identity, load_peers
from common.audit.keys import Signer
from common.config import RunConfig
from common.errors import AuditError, ConfigError, MessageFormatError
from common.messages import (
    SecAggBundles,
    SecAggComplaints,
    SecAggConsistency,
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggSignature,
    SecAggUnmask,
)
from common.node_config import NodeConfig
from common.secagg.protocol import (
    ClientSecrets,
    Roster,
    client_masked_input,
    client_open_bundles,
    client_share_bundles,
    client_unmask,
    majority_threshold,
    seed_commitment,
)
from common.secagg.signatures import (
    bundle_statement,
    check_roster,
    check_signature,
    count_signatures,
    keys_statement,
    survivors_statement,
)


@dataclass(frozen=True)
class Credentials:
    """What a node needs to take part: its signing identity and its own copy of the consortium's allow-list."""

    signer: Signer
    peers: dict[str, str]  # institution -> "ed25519:..." public key


def node_credentials(cfg: RunConfig, node: NodeConfig) -> Credentials:
    """This node's credentials; a ConfigError when it has no identity or no allow-list of its own."""
    identity, peers = load_identity(cfg, node), load_peers(cfg, node)
    if identity is None or peers is None:
        raise ConfigError(
            "secure aggregation needs this node's signing identity (node config institution-id and signing-key) and its "
            "own copy of the consortium's allow-list (node config allow-list, or allow-list.toml beside its release log): "
            "its round keys are signed, and its peers' keys checked against that list, so that a coordinator cannot "
            "slip in keys of its own; `fedstill simulate` provisions both")
    return Credentials(identity.signer, peers)


def context_bytes(run_id: int, round_: int) -> bytes:
    """What binds every key derivation and bundle to one run and round."""
    return f"fedstill/{run_id}/{round_}".encode()


def round_keys(state: RecordDict, run_id: int, node: int, me: Credentials, round_: int) -> SecAggKeys:
    """Step 1: fresh X25519 key pairs for this round, the public halves signed; the private halves stay in node state."""
    answered = secagg_answered(state, run_id)
    if round_ <= answered:
        raise AuditError(f"secure aggregation: this node sent its masked soft labels in round {answered} of this run; "
                         f"it takes part in no round {round_} again (two masked answers could be subtracted)", "secagg")
    secrets = ClientSecrets.generate()
    keep_secagg_round(state, SecAggRound(round_, secrets.mask_private, secrets.share_private))
    mask_key, share_key = secrets.public_keys()
    signature = me.signer.sign(keys_statement(run_id, round_, node, me.signer.name, mask_key, share_key))
    return SecAggKeys(round_, mask_key, share_key, me.signer.name, signature)


def share_bundles(state: RecordDict, run_id: int, node: int, me: Credentials, request: SecAggRoster) -> SecAggBundles:
    """Step 2: check the roster and threshold and pin them; draw the self seed; seal and sign shares of it and of the
    mask key for every member. The site policy's floor is checked before (client_app)."""
    kept = _round(state, run_id, request.round)
    if kept.roster is not None:
        raise AuditError(f"secure aggregation: this node already gave its shares for round {request.round}; it gives "
                         "them once, to one roster", "secagg")
    _check_own_keys(kept, request.roster, node)
    check_roster(request.roster, me.peers, run_id, request.round)
    least, parties = majority_threshold(len(request.roster)), len(request.roster)
    if not least <= request.threshold <= parties:
        raise AuditError(f"secure aggregation: threshold {request.threshold} for a roster of {parties}: it must be at least "
                         f"{least} (more than half of the roster, and 3) and at most {parties}", "secagg")
    context = context_bytes(run_id, request.round)
    seed, bundles = client_share_bundles(node, _secrets(kept), request.roster, request.threshold, context)
    signatures = {peer: me.signer.sign(bundle_statement(run_id, request.round, node, peer, bundle))
                  for peer, bundle in bundles.items()}
    keep_secagg_round(state, dataclasses.replace(kept, self_seed=seed, roster=dict(request.roster),
                                                 threshold=request.threshold, weighted=request.weighted))
    return SecAggBundles(request.round, bundles, signatures, seed_commitment(seed, context))


def open_inbox(state: RecordDict, run_id: int, node: int, me: Credentials, request: SecAggInbox) -> SecAggComplaints:
    """Step 3: open the bundles sealed for this node; name the senders whose signed bundles do not open.

    A bundle its sender did not sign was altered in relay, by the coordinator: the whole inbox is refused.
    """
    kept, roster = _pinned(state, run_id, request.round)
    if kept.opened is not None:
        raise AuditError(f"secure aggregation: this node already opened its inbox of round {request.round}", "secagg")
    for source, bundle in sorted(request.bundles.items()):
        if source not in roster:
            raise AuditError(f"secure aggregation: the inbox holds a bundle from node {source}, which is not in the roster "
                             "this node gave its shares to", "secagg")
        check_signature(me.peers, roster[source].institution, request.signatures[source],
                        bundle_statement(run_id, request.round, source, node, bundle),
                        f"secure aggregation: the bundle relayed from node {source}", "secagg")
    opened, failed = client_open_bundles(node, _secrets(kept), roster, request.bundles,
                                         context_bytes(run_id, request.round))
    keep_secagg_round(state, dataclasses.replace(kept, opened=opened))
    return SecAggComplaints(request.round, failed)


def admit_secure_query(state: RecordDict, run_id: int, node: int, round_: int, shared: SecAggRoster | None,
                       secure: bool) -> None:
    """Before any training: a soft-label query of a secure run must carry the set U (a plain answer would leave in the
    clear), of the query's round, and pass step 4's checks (`admit_masked`)."""
    if shared is None:
        if secure:
            raise AuditError("this run is under secure aggregation: a soft-label query without a roster would send the "
                             "soft labels in the clear, and is refused", "secagg")
        return
    if shared.round != round_:
        raise MessageFormatError(f"secagg: the roster is of round {shared.round}, the query of round {round_}")
    admit_masked(state, run_id, node, shared)


def admit_masked(state: RecordDict, run_id: int, node: int, shared: SecAggRoster) -> SecAggRound:
    """Step 4's checks, made before any training: no second masked answer in a round; U within the pinned roster,
    with the same keys, threshold and weighting, holding this node and at least the threshold; every member of U
    one whose shares this node opened."""
    answered = secagg_answered(state, run_id)
    if shared.round <= answered:
        raise AuditError(f"secure aggregation: this node already sent its masked soft labels in round {answered}; a "
                         "second masked answer would let the coordinator subtract the two, and is refused", "secagg")
    kept, roster = _pinned(state, run_id, shared.round)
    if kept.opened is None:
        raise AuditError(f"secure aggregation: this node has not opened its inbox of round {shared.round}, so it cannot "
                         "mask", "secagg")
    if (shared.threshold, shared.weighted) != (kept.threshold, kept.weighted):
        raise AuditError(f"secure aggregation: the query's threshold {shared.threshold} (weighted {shared.weighted}) "
                         f"differs from the {kept.threshold} (weighted {kept.weighted}) this node gave its shares under",
                         "secagg")
    changed = sorted(n for n, entry in shared.roster.items() if roster.get(n) != entry)
    if changed:
        raise AuditError(f"secure aggregation: nodes {changed} are not in the roster this node pinned, or their keys "
                         "differ", "secagg")
    if node not in shared.roster or len(shared.roster) < kept.threshold:
        raise AuditError(f"secure aggregation: this node masks only with a set that holds it and at least the threshold "
                         f"({kept.threshold}), got {len(shared.roster)} members", "secagg")
    unopened = sorted(set(shared.roster) - set(kept.opened))
    if unopened:
        raise AuditError(f"secure aggregation: this node holds no opened shares of nodes {unopened}; it masks with no "
                         "node whose bundle did not open for it", "secagg")
    return kept


def masked_vector(state: RecordDict, run_id: int, node: int, shared: SecAggRoster, probs: np.ndarray,
                  weight: float) -> np.ndarray:
    """Step 4: y = [w * probs, w] + masks with every member of U, once per round; under a weighted rule the
    unweighted probs follow, so that the server can fall back to their plain sum when the weighted one is out of
    range (a peer lied about its weight) instead of losing the round."""
    kept = admit_masked(state, run_id, node, shared)
    if kept.self_seed is None or kept.roster is None:
        raise AuditError("secure aggregation: this node gave no shares this round, so it cannot take part", "secagg")
    flat = probs.astype(np.float64).reshape(-1)
    vector = np.concatenate([weight * flat, [weight], *([flat] if shared.weighted else [])])
    members: Roster = {n: kept.roster[n] for n in shared.roster}
    masked = client_masked_input(node, _secrets(kept), members, kept.self_seed, vector, context_bytes(run_id, shared.round))
    keep_secagg_round(state, dataclasses.replace(kept, shared=tuple(sorted(members))))
    keep_secagg_answered(state, run_id, shared.round)
    return masked


def sign_survivors(state: RecordDict, run_id: int, node: int, me: Credentials, request: SecAggConsistency) -> SecAggSignature:
    """Step 5: sign (U, S) as shown — once per round, S within U, holding this node and at least the threshold."""
    kept, _ = _pinned(state, run_id, request.round)
    if kept.shared is None:
        raise AuditError(f"secure aggregation: this node sent no masked soft labels in round {request.round}; it signs "
                         "no survivor set", "secagg")
    if kept.survivors is not None:
        raise AuditError(f"secure aggregation: this node already signed the survivor set of round {request.round}; it "
                         "signs one survivor set per round", "secagg")
    survivors = set(request.survivors)
    if not survivors <= set(kept.shared) or node not in survivors or len(survivors) < kept.threshold:
        raise AuditError(f"secure aggregation: the survivors must be members of the set this node masked with, this node "
                         f"among them, and at least the threshold ({kept.threshold})", "secagg")
    keep_secagg_round(state, dataclasses.replace(kept, survivors=tuple(sorted(survivors))))
    return SecAggSignature(request.round, me.signer.sign(survivors_statement(run_id, request.round, kept.shared, survivors)))


def unmask_shares(state: RecordDict, run_id: int, node: int, me: Credentials, request: SecAggUnmask) -> SecAggShares:
    """Step 6: for the survivor set this node signed, once a threshold of survivors signed the same (U, S): the
    b-shares of S and the c-shares of U - S; then forget this round's secrets."""
    kept, roster = _pinned(state, run_id, request.round)
    if kept.survivors is None or kept.shared is None:
        raise AuditError(f"secure aggregation: this node signed no survivor set in round {request.round}; it gives no "
                         "share before the consistency step", "secagg")
    if tuple(sorted(request.survivors)) != kept.survivors:
        raise AuditError("secure aggregation: the survivor set differs from the one this node signed; it gives shares "
                         "only for that set", "secagg")
    statement = survivors_statement(run_id, request.round, kept.shared, kept.survivors)
    valid = count_signatures(request.signatures, roster, me.peers, statement, among=kept.survivors)
    if valid < kept.threshold:
        raise AuditError(f"secure aggregation: {valid} survivors validly signed the survivor set this node signed; "
                         f"{kept.threshold} must before it gives any share", "secagg")
    shares = client_unmask(node, kept.opened or {}, set(kept.shared), set(kept.survivors), kept.threshold)
    forget_secagg(state)
    return SecAggShares(request.round, shares)


def _round(state: RecordDict, run_id: int, round_: int) -> SecAggRound:
    kept = secagg_round(state)
    if kept is None or kept.round != round_:
        if secagg_answered(state, run_id) >= round_:
            raise AuditError(f"secure aggregation: this node is done with round {round_} (it forgets a round's secrets "
                             "once it gave its shares) and takes no further step of it", "secagg")
        raise AuditError(f"secure aggregation: this node has no keys for round {round_} (it missed the key exchange)", "secagg")
    return kept


def _pinned(state: RecordDict, run_id: int, round_: int) -> tuple[SecAggRound, Roster]:
    """The round's state, and the roster this node pinned when it gave its shares."""
    kept = _round(state, run_id, round_)
    if kept.roster is None:
        raise AuditError(f"secure aggregation: this node gave no shares in round {round_}, so it takes no later step",
                         "secagg")
    return kept, kept.roster


def _secrets(kept: SecAggRound) -> ClientSecrets:
    return ClientSecrets(kept.mask_private, kept.share_private)


def _check_own_keys(kept: SecAggRound, roster: Roster, node: int) -> None:
    """The roster must carry this node's own public keys: a server may not substitute them."""
    entry = roster.get(node)
    if entry is None or (entry.mask_key, entry.share_key) != _secrets(kept).public_keys():
        raise AuditError("secure aggregation: the roster does not hold this node's keys for the round", "secagg")
