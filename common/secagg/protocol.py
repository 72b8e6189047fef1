"""The secure-aggregation protocol's steps, as pure functions: client setup, masked input, unmasking; server sum.

One round, over four exchanges (Bonawitz et al., 2017, for a semi-honest server):

1. keys: each client makes two X25519 key pairs (mask keys c, share-encryption keys s) and sends
   the public halves; the server publishes the roster (node -> index 1..n, public keys) and the
   threshold t.
2. shares: each client draws a self seed b and splits b and its mask private key c into n Shamir
   shares (threshold t); share j goes to client j inside an AES-GCM bundle (key HKDF(X25519(s_i, S_j))),
   relayed by the server, which cannot open it.
3. masked input: each client that distributed shares sends y_i = x_i + PRG(b_i) + pairwise masks with
   every other such client (common/secagg/masking.py).
4. unmask: the server names the survivors U (whose y arrived) and the dropped D (who shared but sent
   no y); each survivor opens the bundles addressed to it and returns the b-shares of U and the
   c-shares of D, never both for one client. The server rebuilds each b_j (j in U) and c_d (d in D),
   removes the self masks and the dropped clients' pairwise masks, and is left with sum_{i in U} x_i.

What the server holds of one client is y_i, uniformly random on its own, and shares it cannot open.
The round survives any dropouts after step 2 as long as at least t clients answer step 4.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import AuditError, ConfigError
from common.secagg.masking import apply_masks, derive_seed, pairwise_mask, prg, quantise
from common.secagg.shamir import reconstruct, split

SHARE_BYTES = 66  # a share of GF(2^521 - 1)
PAIR_INFO, SHARE_INFO = b"fedstill/secagg/pairwise/", b"fedstill/secagg/share/"


@dataclass(frozen=True)
class RosterEntry:
    index: int  # the client's Shamir point, 1..n
    mask_key: bytes  # X25519 public key for pairwise masks (32 bytes)
    share_key: bytes  # X25519 public key for encrypting shares (32 bytes)


Roster = dict[int, RosterEntry]  # node id -> entry


@dataclass(frozen=True)
class ClientSecrets:
    """A client's two X25519 private keys for one round (kept in node state between the exchanges)."""

    mask_private: bytes
    share_private: bytes

    @classmethod
    def generate(cls) -> ClientSecrets:
        return cls(_raw(X25519PrivateKey.generate()), _raw(X25519PrivateKey.generate()))

    def public_keys(self) -> tuple[bytes, bytes]:
        return _public(self.mask_private), _public(self.share_private)


def make_roster(public_keys: dict[int, tuple[bytes, bytes]]) -> Roster:
    """Server: index the clients that sent keys by sorted node id; refuse duplicated keys."""
    keys = [k for pair in public_keys.values() for k in pair]
    if len(set(keys)) != len(keys) or any(len(k) != 32 for k in keys):
        raise AuditError("secure aggregation: public keys must be distinct 32-byte X25519 keys", "secagg")
    return {node: RosterEntry(i, *public_keys[node]) for i, node in enumerate(sorted(public_keys), start=1)}


def client_share_bundles(
    node: int, secrets: ClientSecrets, roster: Roster, threshold: int, context: bytes
) -> tuple[bytes, dict[int, bytes]]:
    """Step 2: a fresh self seed b, and for every roster member one AES-GCM bundle of its shares of b and c."""
    me = _member(roster, node)
    if not 2 <= threshold <= len(roster):
        raise ConfigError(f"secure aggregation: threshold must be in [2, {len(roster)} clients], got {threshold}")
    self_seed = os.urandom(32)
    points = [entry.index for entry in roster.values()]
    b_shares, c_shares = split(self_seed, threshold, points), split(secrets.mask_private, threshold, points)
    bundles = {
        peer: _seal(secrets, me, entry, context, b_shares[entry.index], c_shares[entry.index])
        for peer, entry in roster.items()
    }
    return self_seed, bundles


def client_masked_input(
    node: int, secrets: ClientSecrets, shared: Roster, self_seed: bytes, vector: np.ndarray, context: bytes
) -> np.ndarray:
    """Step 3: y = x + PRG(b) + pairwise masks with every client that distributed its shares (`shared`)."""
    me = _member(shared, node)
    mask_key = X25519PrivateKey.from_private_bytes(secrets.mask_private)
    pair_seeds = {entry.index: derive_seed(mask_key, entry.mask_key, PAIR_INFO + context)
                  for peer, entry in shared.items() if peer != node}
    return apply_masks(quantise(vector), me.index, self_seed, pair_seeds)


def client_unmask(
    node: int, secrets: ClientSecrets, roster: Roster, threshold: int, bundles: dict[int, bytes],
    survivors: set[int], dropped: set[int], context: bytes,
) -> dict[int, tuple[str, int]]:
    """Step 4: the b-share of every survivor and the c-share of every dropped client, from their bundles.

    Refuses (AuditError) a request that could unmask one client's input: a client both surviving and
    dropped, clients outside the roster, or fewer survivors than the threshold.
    """
    me = _member(roster, node)
    if survivors & dropped or not (survivors | dropped) <= set(roster) or node not in survivors:
        raise AuditError("secure aggregation: survivors and dropped must split the roster, this node surviving", "secagg")
    if len(survivors) < threshold:
        raise AuditError(f"secure aggregation: {len(survivors)} survivors, the threshold is {threshold}", "secagg")
    answer = {}
    for source in sorted(survivors | dropped):
        if source not in bundles:
            raise AuditError(f"secure aggregation: no share bundle from node {source}", "secagg")
        b_share, c_share = _open(secrets, roster[source], me, context, bundles[source], source)
        answer[source] = ("b", b_share) if source in survivors else ("c", c_share)
    return answer


def server_sum(
    masked: dict[int, np.ndarray], answers: dict[int, dict[int, tuple[str, int]]], roster: Roster, threshold: int,
    context: bytes,
) -> np.ndarray:
    """Step 4, server: sum_{i in survivors} x_i (uint64 fixed point) from the masked vectors and the shares.

    `roster` holds the clients that distributed shares (step 2); those of them without a masked
    vector are the dropped, whose pairwise masks are removed with their rebuilt mask keys.
    """
    survivors = set(masked)
    dropped = set(roster) - survivors
    length = len(next(iter(masked.values())))
    total = np.zeros(length, dtype=np.uint64)
    for vector in masked.values():
        total += vector
    for node in sorted(survivors):
        total -= prg(_rebuild(node, "b", answers, roster, threshold), length)
    for gone in sorted(dropped):
        key = X25519PrivateKey.from_private_bytes(_rebuild(gone, "c", answers, roster, threshold))
        for node in sorted(survivors):
            seed = derive_seed(key, roster[node].mask_key, PAIR_INFO + context)
            total -= pairwise_mask(roster[node].index, roster[gone].index, seed, length)
    return total


def _rebuild(source: int, kind: str, answers: dict[int, dict[int, tuple[str, int]]], roster: Roster, threshold: int) -> bytes:
    shares = {roster[responder].index: answer[source][1] for responder, answer in answers.items()
              if source in answer and answer[source][0] == kind}
    try:
        return reconstruct(shares, threshold, length=32)
    except AuditError as error:
        raise AuditError(f"secure aggregation: node {source}'s {'self seed' if kind == 'b' else 'mask key'}: {error}", "secagg") from None


def _seal(secrets: ClientSecrets, me: RosterEntry, peer: RosterEntry, context: bytes, b_share: int, c_share: int) -> bytes:
    key = derive_seed(X25519PrivateKey.from_private_bytes(secrets.share_private), peer.share_key,
                      SHARE_INFO + context + _pair(me.index, peer.index))
    nonce = os.urandom(12)
    plaintext = b_share.to_bytes(SHARE_BYTES, "big") + c_share.to_bytes(SHARE_BYTES, "big")
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context + _pair(me.index, peer.index))


def _open(secrets: ClientSecrets, source: RosterEntry, me: RosterEntry, context: bytes, bundle: bytes, node: int) -> tuple[int, int]:
    key = derive_seed(X25519PrivateKey.from_private_bytes(secrets.share_private), source.share_key,
                      SHARE_INFO + context + _pair(source.index, me.index))
    try:
        plaintext = AESGCM(key).decrypt(bundle[:12], bundle[12:], context + _pair(source.index, me.index))
    except (InvalidTag, ValueError):
        raise AuditError(f"secure aggregation: the share bundle from node {node} (client {source.index}) does not decrypt "
                         f"(altered, or meant for another client or round)", "secagg") from None
    return int.from_bytes(plaintext[:SHARE_BYTES], "big"), int.from_bytes(plaintext[SHARE_BYTES:], "big")


def _pair(source: int, destination: int) -> bytes:
    return source.to_bytes(4, "big") + destination.to_bytes(4, "big")


def _member(roster: Roster, node: int) -> RosterEntry:
    if node not in roster:
        raise AuditError(f"secure aggregation: node {node} is not in this round's roster", "secagg")
    return roster[node]


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
