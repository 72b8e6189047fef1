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

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from client.release import Identity, load_identity
from common.audit import kinds
from common.audit.attestation import Attestation, read_statement
from common.audit.ledger import Ledger
from common.audit.witness import Cosignature, TreeHead, WitnessError, WitnessRequest, check_request
from common.config import RunConfig
from common.errors import AuditError, ConfigError
from common.messages import read_witness_request
from common.node_config import NodeConfig

Handler = Callable[[Message, Context], Message]


def witness_first(handler: Handler) -> Handler:
    """Wrap a ClientApp handler: a witness request the query carries is checked before any work (a refused head
    costs no training and no privacy); the reply cosigns it (client_app._reply)."""

    @functools.wraps(handler)
    def run(message: Message, context: Context) -> Message:
        request = read_witness_request(message.content)
        if request is not None:
            node = NodeConfig.from_node_config(context.node_config)
            identity = load_identity(RunConfig.from_run_config(context.run_config), node)
            if identity is not None:
                precheck(request, identity, pinned_key(node))
        return handler(message, context)

    return run


def pinned_key(node: NodeConfig) -> str | None:
    """The coordinator key node config `coordinator-key` pins: its text, or the .pub file it names."""
    value = node.coordinator_key
    if value is None or value.startswith("ed25519:"):
        return value
    try:
        return Path(value).expanduser().read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError("node config coordinator-key names no readable public key file on this node; give the "
                          "coordinator's coordinator.pub (or its ed25519:... text)") from None


def precheck(request: WitnessRequest, identity: Identity, pinned: str | None = None) -> None:
    """Check `request` against this institution's release log; a refusal is kept in the log and raised."""
    log = _log(identity)
    head = request.head.head
    last, first_key = last_cosigned(log, head.ledger)
    try:
        check_request(request, last, pinned or first_key)
        for receipt in request.receipts:
            _check_own(receipt.entry, identity.signer.name)
    except WitnessError as error:
        log.append(kinds.WITNESS_REFUSED, {"ledger": head.ledger, "size": head.size, "reason": str(error)})
        raise


def witness(request: WitnessRequest, identity: Identity, pinned: str | None = None) -> Cosignature:
    """Check `request` (precheck), then cosign its head and keep head and receipts in the release log."""
    precheck(request, identity, pinned)
    log = _log(identity)
    head = request.head.head
    cosignature = Cosignature.sign(head, identity.signer)
    log.append(kinds.COSIGNED, {**head.as_dict(), "coordinator_key": request.head.key, "coordinator_sig": request.head.sig,
                                "sig": cosignature.sig})
    for receipt in request.receipts:
        log.append(kinds.RECEIPT, {**head.as_dict(), **receipt.as_dict()})
    return cosignature


def _log(identity: Identity) -> Ledger:
    return Ledger.open(identity.release_log, identity.signer, {"institution_id": identity.signer.name})


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
