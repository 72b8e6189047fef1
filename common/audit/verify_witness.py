"""Verification of the witnessing (common.audit.witness): the coordinator's tree heads, the institutions'
cosignatures and the quorum on the final head, and each institution's own record of what it cosigned
and was receipted.

Without the institutions' release logs these checks prove the ledger is what its institutions cosigned
(a quorum of them, on the head that covers the closing entry). With the logs they also catch what a
coordinator could do with its own key alone: cut the ledger back (to an earlier run's closing entry,
say: an institution cosigned a longer one), show institutions different histories (a fork: what one
cosigned at some size is not this ledger's root at that size), re-sign it under another key, or drop an
accepted reply (the institution holds its receipt).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.audit import kinds
from common.audit.canonical import canonical
from common.audit.chain import Chain
from common.audit.merkle import leaf_hash, root
from common.audit.witness import Cosignature, Receipt, SignedHead, TreeHead
from common.errors import AuditError

WITNESS_KINDS = (kinds.TREE_HEAD, kinds.COSIGNED)  # may follow the closing entry, with the witness exchange
STOPPED_UNWITNESSED = ("no tree head covers the closing entry: the run was stopped with `flwr stop`, and Flower cut it off "
                       "from the institutions before they could cosign its end; resume the run (its end is then witnessed), "
                       "or pass --quorum 0 to accept a record whose end only the coordinator signed")


class Tree:
    """The ledger's leaves as written (leaf i = line i) and the roots of its prefixes, computed on demand."""

    def __init__(self, lines: list[bytes]) -> None:
        self.leaves = [leaf_hash(line) for line in lines]
        self._roots: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.leaves)

    def root(self, size: int) -> str:
        if size not in self._roots:
            self._roots[size] = root(self.leaves[:size]).hex()
        return self._roots[size]


def after_closing(entry: dict[str, Any]) -> bool:
    """Whether `entry` may follow the closing entry: the final head, its exchange and its cosignatures."""
    kind, phase = entry.get("kind"), (entry.get("body") or {}).get("phase")
    return kind in WITNESS_KINDS or (kind in (kinds.EXCHANGE_OPENED, kinds.REPLY_ACCEPTED, kinds.REPLY_REJECTED)
                                     and phase == kinds.WITNESS_PHASE)


def check_ledger_witnessing(chain: Chain, tree: Tree, keys: Mapping[str, str] | None, quorum: int | None,
                            notes: list[str]) -> None:
    """Every tree head signed by the ledger's key over the ledger's own prefix; every cosignature by an
    allow-listed key on a recorded head; the final head (covering the closing entry) cosigned by `quorum`
    institutions, by default every institution with an accepted reply in the run's last round."""
    heads: dict[int, TreeHead] = {}
    cosigned: dict[int, set[str]] = {}
    closing, stopped = None, False
    for number, entry in chain.entries:
        kind, body = entry["kind"], entry["body"]
        if kind in kinds.CLOSING:
            closing, stopped = entry["seq"], kind == kinds.RUN_STOPPED
        if kind == kinds.TREE_HEAD:
            head = _recorded_head(chain, tree, number, entry)
            if head is not None:
                heads[head.size] = head
        elif kind == kinds.COSIGNED:
            try:
                cosignature = Cosignature.from_dict(body, "cosignature")
                cosignature.verify(keys, "cosignature")
            except AuditError as error:
                chain.problem(number, entry, "cosignature", str(error).removeprefix("cosignature: "))
                continue
            if heads.get(cosignature.head.size) != cosignature.head:
                chain.problem(number, entry, "cosignature", f"cosigns a tree head of size {cosignature.head.size} that "
                                                            "no earlier tree-head entry recorded")
                continue
            cosigned.setdefault(cosignature.head.size, set()).add(cosignature.institution_id)
    if keys is None or closing is None:
        if keys is None:
            notes.append("no allow-list: the ledger's witnessing is not checked")
        return
    final = min((size for size in heads if size > closing), default=None)
    present = _present_at_end(chain)
    if final is None:
        if quorum is None and not present:
            notes.append("nobody was present at the end of the run to witness it (no institution's reply was used)")
        elif quorum != 0:
            number, last = chain.entries[-1]
            chain.problem(number, last, "witness", STOPPED_UNWITNESSED if stopped else
                          "no tree head covers the closing entry: the institutions never cosigned the end of the record "
                          "(pass --quorum 0 to accept that)")
        return
    got = cosigned.get(final, set())
    if quorum is None:
        missing = sorted(present - got)
        if missing:
            chain.problem(None, None, "witness", f"the final tree head (size {final}) lacks the cosignature of {missing}, "
                                                 "present at the end of the run")
    elif len(got) < quorum:
        chain.problem(None, None, "witness", f"the final tree head (size {final}) has {len(got)} cosignature(s), "
                                             f"the quorum is {quorum}")
    notes.append(f"final tree head (size {final}, root {heads[final].root[:16]}...) cosigned by {sorted(got)}")


def _recorded_head(chain: Chain, tree: Tree, number: int, entry: dict[str, Any]) -> TreeHead | None:
    try:
        signed = SignedHead.from_dict(entry["body"], "tree head")
        signed.verify("tree head")
    except AuditError as error:
        chain.problem(number, entry, "tree head", str(error).removeprefix("tree head: "))
        return None
    head = signed.head
    if signed.key != entry.get("key") or head.ledger != entry.get("ledger"):
        chain.problem(number, entry, "tree head", "signed by another key than the ledger's, or for another ledger")
    elif head.size > entry["seq"]:
        chain.problem(number, entry, "tree head", f"covers {head.size} entries, but is entry {entry['seq']}")
    elif tree.root(head.size) != head.root:
        chain.problem(number, entry, "tree head", f"root {head.root[:16]}... is not the root of the ledger's first "
                                                  f"{head.size} entries ({tree.root(head.size)[:16]}...)")
    else:
        return head
    return None


def _present_at_end(chain: Chain) -> set[str]:
    """The institutions present at the end of the ledger's last run: those its last aggregation used, or, when the
    run aggregated nothing, those with an accepted reply in its last round."""
    last_round: Any = None
    present: set[str] = set()
    aggregated: set[str] | None = None
    for _, entry in chain.entries:
        kind, body = entry["kind"], entry["body"]
        if kind == kinds.RUN_STARTED:
            last_round, present, aggregated = None, set(), None
        elif kind == kinds.AGGREGATED:
            aggregated = {name for name in body.get("institutions") or [] if isinstance(name, str)}
        elif kind in (kinds.ROUND_OPENED, kinds.EXCHANGE_OPENED) and body.get("phase") != kinds.WITNESS_PHASE:
            if body.get("round") != last_round:
                last_round, present = body.get("round"), set()
        elif kind == kinds.REPLY_ACCEPTED and body.get("round") == last_round and body.get("phase") != kinds.WITNESS_PHASE \
                and isinstance(body.get("institution_id"), str):
            present.add(body["institution_id"])
    return aggregated if aggregated is not None else present


def check_log_witnessing(chain: Chain, log: Chain, tree: Tree, institution: str | None) -> None:
    """What `institution` cosigned and was receipted for this ledger, against the ledger: a head longer than
    the ledger (cut), another root at the same size (a fork, or entries rewritten), a head signed by
    another coordinator key, a receipted entry that is not in the ledger as receipted (left out, or changed)."""
    ledger_id = chain.entries[0][1].get("ledger") if chain.entries else None
    ledger_key = chain.entries[0][1].get("key") if chain.entries else None
    for number, entry in log.entries:
        body = entry["body"]
        if entry["kind"] not in (kinds.COSIGNED, kinds.RECEIPT) or body.get("ledger") != ledger_id:
            continue
        try:
            head = TreeHead.from_dict(body, "witness")
        except AuditError as error:
            log.problem(number, entry, "witness", str(error))
            continue
        if head.size > len(tree):
            log.problem(number, entry, "truncation", f"{institution!r} cosigned this ledger at {head.size} entries; it "
                                                     f"has {len(tree)}: entries were cut")
        elif tree.root(head.size) != head.root:
            log.problem(number, entry, "fork", f"{institution!r} cosigned another history: at {head.size} entries its "
                                               f"root is {head.root[:16]}..., this ledger's {tree.root(head.size)[:16]}...")
        if entry["kind"] == kinds.COSIGNED and body.get("coordinator_key") != ledger_key:
            log.problem(number, entry, "witness", f"{institution!r} cosigned heads signed by another coordinator key "
                                                  "than this ledger's: the ledger was re-signed")
        if entry["kind"] == kinds.RECEIPT:
            _check_receipt(chain, log, number, entry, head, institution)


def _check_receipt(chain: Chain, log: Chain, number: int, entry: dict[str, Any], head: TreeHead,
                   institution: str | None) -> None:
    try:
        receipt = Receipt.from_dict(entry["body"], "receipt")
    except AuditError as error:
        log.problem(number, entry, "receipt", str(error).removeprefix("receipt: "))
        return
    if not receipt.included(head):
        log.problem(number, entry, "receipt", f"the receipt for entry {receipt.seq} does not prove its inclusion")
        return
    held = next((e for _, e in chain.entries if e["seq"] == receipt.seq), None)
    if held is None or canonical(held) != canonical(receipt.entry):
        round_ = (receipt.entry.get("body") or {}).get("round")
        log.problem(number, entry, "receipt", f"{institution!r} holds a receipt for entry {receipt.seq} (its accepted "
                                              f"reply of round {round_}), which this ledger does not hold as receipted: "
                                              "the reply was left out, or the entry changed")
