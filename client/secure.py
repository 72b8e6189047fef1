"""The institution's side of secure aggregation: round keys, share bundles, the masked answer, unmasking shares.

The round's private keys and self seed live in node state (client.node_state) between the four
exchanges and are deleted when the round's shares have been given; they never leave the node.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from client.node_state import forget_secagg, keep_secagg_keys, keep_self_seed, secagg_secrets
from common.errors import AuditError
from common.messages import SecAggBundles, SecAggKeys, SecAggRoster, SecAggShares, SecAggUnmask
from common.secagg.protocol import ClientSecrets, client_masked_input, client_share_bundles, client_unmask


def context_bytes(run_id: int, round_: int) -> bytes:
    """What binds every key derivation and bundle to one run and round."""
    return f"fedstill/{run_id}/{round_}".encode()


def round_keys(state: RecordDict, round_: int) -> SecAggKeys:
    """Step 1: fresh X25519 key pairs for this round; the private halves stay in node state."""
    secrets = ClientSecrets.generate()
    keep_secagg_keys(state, round_, secrets.mask_private, secrets.share_private)
    return SecAggKeys(round_, *secrets.public_keys())


def share_bundles(state: RecordDict, node: int, run_id: int, request: SecAggRoster) -> SecAggBundles:
    """Step 2: draw the self seed, keep it, and seal shares of it and of the mask key for every member."""
    secrets = _secrets(state, request.round)
    _check_keys(secrets, request, node)
    self_seed, bundles = client_share_bundles(node, secrets, request.roster, request.threshold,
                                              context_bytes(run_id, request.round))
    keep_self_seed(state, self_seed)
    return SecAggBundles(request.round, bundles)


def masked_vector(state: RecordDict, node: int, run_id: int, shared: SecAggRoster, probs: np.ndarray, weight: float) -> np.ndarray:
    """Step 3: y = [w * probs, w] + masks, with every institution that distributed its shares."""
    secrets = _secrets(state, shared.round)
    _check_keys(secrets, shared, node)
    kept = secagg_secrets(state)
    seed = None if kept is None else kept.self_seed
    if seed is None:
        raise AuditError("secure aggregation: this node gave no shares this round, so it cannot take part", "secagg")
    vector = np.concatenate([weight * probs.astype(np.float64).reshape(-1), [weight]])
    return client_masked_input(node, secrets, shared.roster, seed, vector, context_bytes(run_id, shared.round))


def unmask_shares(state: RecordDict, node: int, run_id: int, request: SecAggUnmask, shared: SecAggRoster) -> SecAggShares:
    """Step 4: the shares the server needs, then forget this round's secrets."""
    secrets = _secrets(state, request.round)
    shares = client_unmask(node, secrets, shared.roster, shared.threshold, request.bundles, set(request.survivors),
                           set(request.dropped), context_bytes(run_id, request.round))
    forget_secagg(state)
    return SecAggShares(request.round, shares)


def _secrets(state: RecordDict, round_: int) -> ClientSecrets:
    kept = secagg_secrets(state)
    if kept is None or kept.round != round_:
        raise AuditError(f"secure aggregation: this node has no keys for round {round_} (it missed the key exchange)", "secagg")
    return ClientSecrets(kept.mask_private, kept.share_private)


def _check_keys(secrets: ClientSecrets, roster: SecAggRoster, node: int) -> None:
    """The roster must carry this node's own public keys: a server may not substitute them."""
    entry = roster.roster.get(node)
    if entry is None or (entry.mask_key, entry.share_key) != secrets.public_keys():
        raise AuditError("secure aggregation: the roster does not hold this node's keys for the round", "secagg")
