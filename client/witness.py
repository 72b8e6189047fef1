"""The institution witnesses the coordinator's ledger (common.audit.witness) before any reply leaves.

A query that carries a witness request is answered only after this node has checked the coordinator's
tree head against what the institution itself cosigned before, from its own release log: the same
coordinator key for that ledger (node config `coordinator-key`, or the key of the first head it cosigned
of that ledger), no rollback, no fork (a consistency proof), and every receipt an entry accepting one of
this institution's own releases, included in the head. It then cosigns the head, and keeps the cosigned
head and the receipts in its release log (kinds `cosigned`, `receipt`). A head it refuses is kept there
too (`witness-refused`) and the query gets a `WitnessError` reply, which the coordinator records.
"""

from __future__ import annotations

from typing import Any

from client.release import Identity
from common.audit import kinds
from common.audit.attestation import Attestation, read_statement
from common.audit.ledger import Ledger
from common.audit.witness import Cosignature, TreeHead, WitnessError, WitnessRequest, check_request
from common.errors import AuditError


def witness(request: WitnessRequest, identity: Identity, pinned_key: str | None = None) -> Cosignature:
    """Check `request` against this institution's release log, then cosign it and log head and receipts."""
    log = Ledger.open(identity.release_log, identity.signer, {"institution_id": identity.signer.name})
    head = request.head.head
    last, first_key = last_cosigned(log, head.ledger)
    try:
        check_request(request, last, pinned_key or first_key)
        for receipt in request.receipts:
            _check_own(receipt.entry, identity.signer.name)
    except WitnessError as error:
        log.append(kinds.WITNESS_REFUSED, {"ledger": head.ledger, "size": head.size, "reason": str(error)})
        raise
    cosignature = Cosignature.sign(head, identity.signer)
    log.append(kinds.COSIGNED, {**head.as_dict(), "coordinator_key": request.head.key, "coordinator_sig": request.head.sig,
                                "sig": cosignature.sig})
    for receipt in request.receipts:
        log.append(kinds.RECEIPT, {**head.as_dict(), **receipt.as_dict()})
    return cosignature


def last_cosigned(log: Ledger, ledger_id: str) -> tuple[TreeHead | None, str | None]:
    """The last head of `ledger_id` this institution cosigned, and the coordinator key of the first one."""
    last, first_key = None, None
    for entry in log.entries():
        body = entry["body"]
        if entry["kind"] == kinds.COSIGNED and body.get("ledger") == ledger_id:
            last = TreeHead.from_dict(body, "release log cosigned entry")
            first_key = first_key or body.get("coordinator_key")
    return last, first_key


def _check_own(entry: dict[str, Any], institution: str) -> None:
    """A receipt is for an entry accepting a reply this institution signed."""
    body = entry.get("body") if isinstance(entry.get("body"), dict) else {}
    attestation = body.get("attestation") if isinstance(body, dict) else None
    if entry.get("kind") != kinds.REPLY_ACCEPTED or not isinstance(attestation, dict):
        raise WitnessError("witness: a receipt is for an entry that accepts no reply")
    try:
        fields = read_statement(Attestation(str(attestation.get("statement")), str(attestation.get("signature"))), "receipt")
    except AuditError:
        raise WitnessError("witness: a receipt's entry carries an unreadable attestation") from None
    if fields.get("institution_id") != institution:
        raise WitnessError(f"witness: a receipt is for a reply of {fields.get('institution_id')!r}, not of this institution")
