"""The secure-aggregation protocol's steps, as pure functions: client keys, shares, masked input, unmasking; server sum.

One round (Bonawitz et al., 2017, the variant that holds against an active server; the exchanges and what
each party checks are in docs/privacy.md, the signatures in common/secagg/signatures.py):

1. keys: each client makes two X25519 key pairs (mask keys c, share-encryption keys s) and sends the
   public halves, signed with its long-term identity; the server publishes the roster (node -> index 1..n,
   public keys, signatures) and the threshold t, which every client checks and pins at step 2.
2. shares: each client draws a self seed b and splits b and its mask private key c into n Shamir shares
   (threshold t); share j goes to client j inside an AES-GCM bundle (key HKDF(X25519(s_i, S_j))), signed by
   its sender and relayed by the server, which cannot open it; the server keeps a commitment to b.
3. inbox: each client opens the bundles addressed to it now, before anyone masks, and names the senders
   whose signed bundles do not open; the server drops one side of every such dispute.
4. masked input: each client of the set U that the server names sends y_i = x_i + PRG(b_i) + pairwise masks
   with every other member of U (common/secagg/masking.py), once per round.
5. consistency: the survivors S (whose y arrived) each sign (U, S) as they were shown them.
6. unmask: a client that sees at least t valid signatures on its own (U, S) returns the b-shares of S and the
   c-shares of U - S, never both for one client. The server rebuilds each b_j (j in S) and c_d (d in U - S),
   checking each against its commitment or public key, removes the self masks and the dropped clients'
   pairwise masks, and is left with sum_{i in S} x_i.

What the server holds of one client is y_i, uniformly random on its own, and shares it cannot open.
The round survives any dropouts after step 4 as long as at least t clients answer step 6.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import AuditError, ConfigError
from common.secagg.masking import apply_masks, derive_seed, pairwise_mask, prg, public_key_problem, quantise
from common.secagg.shamir import PRIME, reconstruct_verified, split

SHARE_BYTES = 66  # a share of GF(2^521 - 1)
PAIR_INFO, SHARE_INFO, SEED_INFO = b"fedstill/secagg/pairwise/", b"fedstill/secagg/share/", b"fedstill/secagg/seed/"
MIN_PARTIES = 3  # with two, each learns the other's input from the sum


@dataclass(frozen=True)
class RosterEntry:
    index: int  # the client's Shamir point, 1..n
    mask_key: bytes  # X25519 public key for pairwise masks (32 bytes)
    share_key: bytes  # X25519 public key for encrypting shares (32 bytes)
    institution: str = ""  # the allow-listed institution that signed these keys
    signature: str = ""  # its Ed25519 signature of signatures.keys_statement(...), base64


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


@dataclass
class Opened:
    """What the server opens: the survivors' sum, and who returned shares off their source's polynomial."""

    total: np.ndarray  # uint64 fixed point
    altered: dict[int, list[int]] = field(default_factory=dict)  # responder node -> sources of its altered shares


def majority_threshold(parties: int) -> int:
    """The least threshold any node accepts for a roster of `parties`: more than half of it, never below 3.

    Why a majority: every node signs one survivor set per round and reveals shares only on seeing t signatures
    on the set it signed; two different sets would need 2t > n signers, so all nodes that reveal agree on the
    survivors and no node's b and c both open. Peers colluding with the server can sign twice: against c of
    them the threshold must exceed (n + c) / 2, which an institution's site policy can demand."""
    return max(MIN_PARTIES, parties // 2 + 1)


def make_roster(public_keys: Mapping[int, tuple[bytes, bytes]], signed: Mapping[int, tuple[str, str]] | None = None) -> Roster:
    """Server: index the clients that sent keys by sorted node id, with who signed each pair (`signed`: node ->
    institution, signature); refuse invalid, small-order or duplicated keys."""
    keys = [k for pair in public_keys.values() for k in pair]
    if len(set(keys)) != len(keys) or any(public_key_problem(k) for k in keys):
        raise AuditError("secure aggregation: public keys must be distinct valid X25519 keys (32 bytes, canonical, "
                         "not of small order)", "secagg-key")
    signed = signed or {}
    return {node: RosterEntry(i, *public_keys[node], *signed.get(node, ("", "")))
            for i, node in enumerate(sorted(public_keys), start=1)}


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


def seed_commitment(self_seed: bytes, context: bytes) -> bytes:
    """What the server keeps of a self seed to recognise it when rebuilt: sha256 of it, bound to the round.
    The seed is 32 random bytes, so the commitment says nothing of it."""
    return hashlib.sha256(SEED_INFO + context + self_seed).digest()


def client_open_bundles(
    node: int, secrets: ClientSecrets, roster: Roster, bundles: Mapping[int, bytes], context: bytes
) -> tuple[dict[int, tuple[int, int]], list[int]]:
    """Step 3: open every bundle addressed to this client: source -> (b-share, c-share), and the sources whose
    bundle does not decrypt or holds no shares."""
    me = _member(roster, node)
    opened, failed = {}, []
    for source, bundle in sorted(bundles.items()):
        try:
            shares = _open(secrets, _member(roster, source), me, context, bundle, source)
        except AuditError:
            failed.append(source)
            continue
        opened[source] = shares
    return opened, failed


def client_masked_input(
    node: int, secrets: ClientSecrets, shared: Roster, self_seed: bytes, vector: np.ndarray, context: bytes
) -> np.ndarray:
    """Step 4: y = x + PRG(b) + pairwise masks with every client of `shared` (the set U)."""
    me = _member(shared, node)
    mask_key = X25519PrivateKey.from_private_bytes(secrets.mask_private)
    pair_seeds = {entry.index: derive_seed(mask_key, entry.mask_key, PAIR_INFO + context)
                  for peer, entry in shared.items() if peer != node}
    return apply_masks(quantise(vector), me.index, self_seed, pair_seeds)


def client_unmask(
    node: int, opened: Mapping[int, tuple[int, int]], shared: set[int], survivors: set[int], threshold: int,
) -> dict[int, tuple[str, int]]:
    """Step 6: the b-share of every survivor and the c-share of every other member of U (`shared`).

    Refuses (AuditError) a survivor set that could unmask one client's input: members outside U, this node
    not surviving, or fewer survivors than the threshold. The dropped are U - survivors, as this node was
    shown U, so one answer never holds both shares of one client.
    """
    if not survivors <= shared or node not in survivors:
        raise AuditError("secure aggregation: the survivors must be members of the set this node masked with, "
                         "this node among them", "secagg")
    if len(survivors) < threshold:
        raise AuditError(f"secure aggregation: {len(survivors)} survivors, the threshold is {threshold}", "secagg")
    missing = sorted(shared - set(opened))
    if missing:
        raise AuditError(f"secure aggregation: no opened share bundle from nodes {missing}", "secagg")
    return {source: ("b", opened[source][0]) if source in survivors else ("c", opened[source][1])
            for source in sorted(shared)}


def server_sum(
    masked: dict[int, np.ndarray], answers: dict[int, dict[int, tuple[str, int]]], roster: Roster, threshold: int,
    context: bytes, commitments: Mapping[int, bytes],
) -> Opened:
    """Step 6, server: sum_{i in survivors} x_i (uint64 fixed point) from the masked vectors and the shares.

    `roster` is U, the clients asked for masked vectors; those of them without one are the dropped, whose
    pairwise masks are removed with their rebuilt mask keys. Each rebuilt secret is checked (a self seed
    against its commitment, a mask key against its public key), so altered shares are skipped and named.
    """
    survivors = set(masked)
    dropped = set(roster) - survivors
    length = len(next(iter(masked.values())))
    opened = Opened(np.zeros(length, dtype=np.uint64))
    for vector in masked.values():
        opened.total += vector
    for node in sorted(survivors):
        seed = _rebuild(node, "b", answers, roster, threshold, opened, partial(_is_seed, commitments.get(node), context))
        opened.total -= prg(seed, length)
    for gone in sorted(dropped):
        key = X25519PrivateKey.from_private_bytes(
            _rebuild(gone, "c", answers, roster, threshold, opened, partial(_is_mask_key, roster[gone].mask_key)))
        for node in sorted(survivors):
            seed = derive_seed(key, roster[node].mask_key, PAIR_INFO + context)
            opened.total -= pairwise_mask(roster[node].index, roster[gone].index, seed, length)
    opened.altered = {node: sorted(sources) for node, sources in sorted(opened.altered.items())}
    return opened


def _rebuild(source: int, kind: str, answers: dict[int, dict[int, tuple[str, int]]], roster: Roster, threshold: int,
             opened: Opened, is_secret: Callable[[bytes], bool]) -> bytes:
    responders = {roster[responder].index: responder for responder in answers if responder in roster}
    shares = {roster[responder].index: answer[source][1] for responder, answer in answers.items()
              if responder in roster and source in answer and answer[source][0] == kind}
    try:
        secret, altered = reconstruct_verified(shares, threshold, is_secret, length=32)
    except AuditError as error:
        raise AuditError(f"secure aggregation: node {source}'s {'self seed' if kind == 'b' else 'mask key'}: {error}", "secagg") from None
    for index in altered:
        opened.altered.setdefault(responders[index], []).append(source)
    return secret


def _is_seed(commitment: bytes | None, context: bytes, seed: bytes) -> bool:
    return commitment is not None and seed_commitment(seed, context) == commitment


def _is_mask_key(public: bytes, private: bytes) -> bool:
    return _public(private) == public


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
    b_share, c_share = int.from_bytes(plaintext[:SHARE_BYTES], "big"), int.from_bytes(plaintext[SHARE_BYTES:], "big")
    if len(plaintext) != 2 * SHARE_BYTES or b_share >= PRIME or c_share >= PRIME:
        raise AuditError(f"secure aggregation: the share bundle from node {node} holds no valid shares", "secagg")
    return b_share, c_share


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
