"""Witnessing the coordinator's ledger: signed tree heads, cosignatures, consistency and receipts.

The ledger is also the leaf list of an RFC 9162 Merkle tree (common.audit.merkle: leaf = the entry's
canonical JSON line). The coordinator signs **tree heads** (ledger id, size, root) and records each as a
`tree-head` entry. Every query it sends carries a **witness request**: the latest signed head, a
consistency proof from each head the institution may have cosigned last, and **receipts** (the ledger
entries that accepted the institution's replies, each with its inclusion proof at that head).

The institution witnesses (client.witness): it checks the head's signature (the coordinator's key it
pinned, or first saw, for that ledger), that the head extends the last head it cosigned for that ledger
(no rollback, no fork: a consistency proof), and every receipt (its own release, included). Only then
does it **cosign** the head with its identity key and keep head and receipts in its release log; the
coordinator records each cosignature (`cosigned`). A head that does not extend what the institution
cosigned before is refused (`WitnessError`), and the refusal is kept on the node.

So the coordinator cannot show two institutions two histories, rewrite or cut what they cosigned,
nor drop an accepted release, without `fedstill audit verify` finding it from the institutions' logs
(the model of C2SP tlog-witness and Certificate Transparency's signed tree heads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.audit.canonical import canonical
from common.audit.keys import Signer, verify_signature
from common.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from common.errors import AuditError, FedstillError

HEAD_KIND = "fedstill/tree-head/v1"


class WitnessError(FedstillError):
    """An institution refused to cosign a tree head: a bad signature, a rollback, a fork or a bad receipt."""


@dataclass(frozen=True)
class TreeHead:
    """The state of one ledger at `size` entries: its id and the Merkle root (hex) of those entries."""

    ledger: str
    size: int
    root: str

    def message(self) -> bytes:
        """The bytes the coordinator signs and institutions cosign."""
        return canonical({"kind": HEAD_KIND, "ledger": self.ledger, "size": self.size, "root": self.root})

    def as_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger, "size": self.size, "root": self.root}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> TreeHead:
        ledger, size, root = raw.get("ledger"), raw.get("size"), raw.get("root")
        if not isinstance(ledger, str) or isinstance(size, bool) or not isinstance(size, int) or size < 1 \
                or not isinstance(root, str) or len(root) != 64:
            raise AuditError(f"{where}: a tree head needs ledger (text), size (>= 1) and root (64 hex digits), got {dict(raw)!r}")
        try:
            bytes.fromhex(root)
        except ValueError:
            raise AuditError(f"{where}: tree head root {root!r} is not hex") from None
        return cls(ledger, size, root)


@dataclass(frozen=True)
class SignedHead:
    """A tree head with the coordinator's signature."""

    head: TreeHead
    key: str  # "ed25519:..." of the coordinator
    sig: str

    @classmethod
    def sign(cls, head: TreeHead, signer: Signer) -> SignedHead:
        return cls(head, signer.public, signer.sign(head.message()))

    def verify(self, where: str) -> None:
        verify_signature(self.key, self.sig, self.head.message(), where)

    def as_dict(self) -> dict[str, Any]:
        return {**self.head.as_dict(), "key": self.key, "sig": self.sig}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> SignedHead:
        key, sig = raw.get("key"), raw.get("sig")
        if not isinstance(key, str) or not isinstance(sig, str):
            raise AuditError(f"{where}: a signed tree head needs key and sig (text)")
        return cls(TreeHead.from_dict(raw, where), key, sig)


@dataclass(frozen=True)
class Cosignature:
    """An institution's signature on a tree head it checked."""

    head: TreeHead
    institution_id: str
    key: str
    sig: str

    @classmethod
    def sign(cls, head: TreeHead, signer: Signer) -> Cosignature:
        return cls(head, signer.name, signer.public, signer.sign(head.message()))

    def verify(self, allow_list: Mapping[str, str] | None, where: str) -> None:
        """The signature holds, under the institution's allow-listed key when an allow-list is given."""
        if allow_list is not None and allow_list.get(self.institution_id) != self.key:
            raise AuditError(f"{where}: cosignature by {self.institution_id!r} under a key the allow-list does not give it")
        verify_signature(self.key, self.sig, self.head.message(), where)

    def as_dict(self) -> dict[str, Any]:
        return {**self.head.as_dict(), "institution_id": self.institution_id, "key": self.key, "sig": self.sig}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> Cosignature:
        institution, key, sig = raw.get("institution_id"), raw.get("key"), raw.get("sig")
        if not all(isinstance(v, str) for v in (institution, key, sig)):
            raise AuditError(f"{where}: a cosignature needs institution_id, key and sig (text)")
        return cls(TreeHead.from_dict(raw, where), str(institution), str(key), str(sig))


@dataclass(frozen=True)
class Receipt:
    """Ledger entry `seq` (the whole entry) is leaf `seq` of the tree of a head: `proof` is its inclusion proof."""

    seq: int
    entry: dict[str, Any]
    proof: tuple[str, ...]

    def included(self, head: TreeHead) -> bool:
        return verify_inclusion(leaf_hash(canonical(self.entry)), self.seq, head.size, [bytes.fromhex(p) for p in self.proof],
                                bytes.fromhex(head.root))

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "entry": self.entry, "proof": list(self.proof)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> Receipt:
        seq, entry, proof = raw.get("seq"), raw.get("entry"), raw.get("proof")
        if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(entry, dict) or not isinstance(proof, list) \
                or not _hexes(proof):
            raise AuditError(f"{where}: a receipt needs seq, entry (object) and proof (list of hex)")
        return cls(seq, entry, tuple(proof))


@dataclass(frozen=True)
class WitnessRequest:
    """What a query asks an institution to witness: the head, consistency proofs from the sizes it may have
    cosigned last (size -> proof), and receipts for its accepted replies."""

    head: SignedHead
    proofs: dict[int, tuple[str, ...]] = field(default_factory=dict)
    receipts: tuple[Receipt, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"head": self.head.as_dict(), "proofs": {str(k): list(v) for k, v in self.proofs.items()},
                           "receipts": [r.as_dict() for r in self.receipts]}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WitnessRequest:
        where = "witness request"
        try:
            raw = json.loads(text)
        except ValueError:
            raise AuditError(f"{where}: not JSON") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("head"), dict) or not isinstance(raw.get("proofs"), dict) \
                or not isinstance(raw.get("receipts"), list):
            raise AuditError(f"{where}: needs head, proofs and receipts")
        proofs: dict[int, tuple[str, ...]] = {}
        for size, proof in raw["proofs"].items():
            if not str(size).isdigit() or not _hexes(proof):
                raise AuditError(f"{where}: proofs must map sizes to lists of hex")
            proofs[int(size)] = tuple(proof)
        return cls(SignedHead.from_dict(raw["head"], where), proofs,
                   tuple(Receipt.from_dict(r, where) for r in raw["receipts"] if isinstance(r, dict)))


def check_request(request: WitnessRequest, last: TreeHead | None, coordinator_key: str | None) -> None:
    """What an institution checks before it cosigns (raises WitnessError naming the problem):

    - the head is signed by `coordinator_key` (the key pinned for this ledger);
    - it extends `last`, the last head this institution cosigned for the same ledger: not smaller, and a
      consistency proof from `last.size` to it verifies (a rollback or a fork fails here);
    - every receipt's entry is included in it.
    """
    head = request.head.head
    if coordinator_key is not None and request.head.key != coordinator_key:
        raise WitnessError(f"witness: the tree head of ledger {head.ledger} is signed by another key than the coordinator's "
                           "this institution pinned for it")
    try:
        request.head.verify("witness: tree head")
    except AuditError as error:
        raise WitnessError(str(error)) from None
    if last is not None and last.ledger == head.ledger:
        if head.size < last.size:
            raise WitnessError(f"witness: rollback: the tree head has {head.size} entries, this institution cosigned "
                               f"{last.size} of ledger {head.ledger} before")
        proof = request.proofs.get(last.size)
        if head.size > last.size and proof is None:
            raise WitnessError(f"witness: no consistency proof from size {last.size}, the last head this institution "
                               f"cosigned of ledger {head.ledger}")
        if not verify_consistency(last.size, head.size, bytes.fromhex(last.root), bytes.fromhex(head.root),
                                  [bytes.fromhex(p) for p in proof or ()]):
            raise WitnessError(f"witness: fork: the tree head of size {head.size} does not extend the head of size "
                               f"{last.size} this institution cosigned (ledger {head.ledger})")
    for receipt in request.receipts:
        if not receipt.included(head):
            raise WitnessError(f"witness: the receipt for entry {receipt.seq} does not prove it is in the tree head")


def _hexes(value: Any) -> bool:
    if not isinstance(value, list):
        return False
    try:
        return all(isinstance(v, str) and len(bytes.fromhex(v)) == 32 for v in value)
    except ValueError:
        return False
