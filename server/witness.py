"""The coordinator's side of witnessing (common.audit.witness): sign tree heads of the ledger, build each
institution's witness request, and record the cosignatures that come back.

A head is signed and recorded (`tree-head`) when an exchange opens a round's first query and at the end
of the run; each institution's request carries that head, consistency proofs from every recorded head
since the last one it cosigned (so a cosignature lost on the way back costs nothing), and receipts for
its accepted replies the heads it cosigned do not cover yet. The ledger file is the tree: leaf i is line
i, exactly as written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.audit import kinds
from common.audit.keys import Signer
from common.audit.ledger import Ledger
from common.audit.merkle import consistency_proof, inclusion_proof, leaf_hash, root
from common.audit.witness import Cosignature, Receipt, SignedHead, TreeHead, WitnessRequest
from common.errors import AuditError

PROOFS_KEPT = 16  # at most this many consistency proofs per request: from the latest recorded heads


@dataclass
class Witnessing:
    """Tree heads and cosignatures of one ledger, as the coordinator keeps them."""

    ledger: Ledger
    allow_list: Mapping[str, str]
    bindings: Mapping[int, str] = field(default_factory=dict)  # node -> the institution it answered as so far
    heads: list[TreeHead] = field(default_factory=list)  # recorded, oldest first
    cosigned: dict[str, int] = field(default_factory=dict)  # institution -> largest size it cosigned

    @classmethod
    def of(cls, ledger: Ledger, allow_list: Mapping[str, str], bindings: Mapping[int, str] | None = None) -> Witnessing:
        """Pick up the heads and cosignatures already in the ledger (a restarted or resumed run); `bindings`: the
        audit trail's node -> institution map, which it keeps up to date."""
        witnessing = cls(ledger, allow_list, {} if bindings is None else bindings)
        for entry in ledger.entries():
            body = entry["body"]
            if entry["kind"] == kinds.TREE_HEAD:
                witnessing.heads.append(TreeHead.from_dict(body, "ledger tree-head entry"))
            elif entry["kind"] == kinds.COSIGNED:
                name = str(body.get("institution_id"))
                witnessing.cosigned[name] = max(witnessing.cosigned.get(name, 0), int(body.get("size", 0)))
        return witnessing

    def requests(self, nodes: list[int]) -> dict[int, WitnessRequest]:
        """Sign the ledger's current head, record it, and make each node's witness request (a node whose
        institution is not known yet gets proofs from every recent head)."""
        lines = self.ledger.path.read_bytes().splitlines()
        leaves = [leaf_hash(line) for line in lines]
        signer: Signer = self.ledger.signer
        head = TreeHead(_ledger_id(lines), len(leaves), root(leaves).hex())
        signed = SignedHead.sign(head, signer)
        self.ledger.append(kinds.TREE_HEAD, signed.as_dict())
        self.heads.append(head)
        accepted = _accepted_by_node(lines)
        requests = {}
        for node in nodes:
            institution = self.bindings.get(node)
            since = self.cosigned.get(institution, 0) if institution else 0
            sizes = [h.size for h in self.heads[:-1] if h.size >= since][-PROOFS_KEPT:] if institution else \
                [h.size for h in self.heads[:-1]][-PROOFS_KEPT:]
            proofs = {size: tuple(p.hex() for p in consistency_proof(leaves, size)) for size in sizes}
            receipts = tuple(Receipt(seq, entry, tuple(p.hex() for p in inclusion_proof(leaves, seq)))
                             for seq, entry in accepted.get(str(node), []) if seq >= since)
            requests[node] = WitnessRequest(signed, proofs, receipts)
        return requests

    def record(self, node: int, institution: str | None, raw: Mapping[str, Any] | None) -> str | None:
        """Check and record the cosignature a reply carried; the problem in words when it is missing or bad."""
        if raw is None:
            return "the reply carries no cosignature of the tree head it was asked to witness"
        try:
            cosignature = Cosignature.from_dict(raw, "cosignature")
            cosignature.verify(self.allow_list, "cosignature")
        except AuditError as error:
            return str(error)
        if institution is not None and cosignature.institution_id != institution:
            return f"cosigned as {cosignature.institution_id!r}, the reply is signed by {institution!r}"
        if cosignature.head not in self.heads:
            return f"cosigns a tree head of size {cosignature.head.size} this coordinator never signed"
        self.ledger.append(kinds.COSIGNED, {**cosignature.as_dict(), "node_id": str(node)})
        name = cosignature.institution_id
        self.cosigned[name] = max(self.cosigned.get(name, 0), cosignature.head.size)
        return None


def _ledger_id(lines: list[bytes]) -> str:
    return str(json.loads(lines[0])["ledger"])


def _accepted_by_node(lines: list[bytes]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    found: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for seq, line in enumerate(lines):
        if b'"kind":"reply-accepted"' not in line:
            continue
        entry = json.loads(line)
        if entry["kind"] == kinds.REPLY_ACCEPTED:
            found.setdefault(str(entry["body"].get("node_id")), []).append((seq, entry))
    return found
