"""Which institution a node id is, as a run's ledger knows it: by a signature it checked, or by a claim only.

Replies carry node ids; people read institutions. The ledger names a node's institution in three ways:
- **attestation**: an accepted reply (any phase, any round of the ledger) carries the institution's
  attestation, which the coordinator checked against the allow-list; `aggregated` and `weight-clipped`
  entries repeat that binding. This is the name to trust (without an allow-list nothing was checked,
  but it is still what the institution signed).
- **claim**: a rejected reply's attestation names an institution the coordinator did *not* accept (a wrong
  key, a bad statement); and a refusal — an error reply, which carries no attestation at all — names the
  institution only in its own words: the node appends `[refused by institution "NAME"]` to the refusal
  (client/scrub.py). Neither is checked; both are shown as claimed.
- neither: the node never named itself (a node that timed out every time, or an older node's refusal).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from common.audit import kinds

REFUSAL_CHECKS = ("privacy-budget", "site-policy")
"""Rejection checks that are the institution's own refusal (its budget, its site policy), not a fault."""
ATTESTATION, CLAIM = "attestation", "claim"
"""How a name was learnt: a checked signature, or the node's unchecked word."""

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # common.audit.keys.NAME_PATTERN
_REFUSED_BY = re.compile(rf'\[refused by institution "({_NAME})"\]')


def refusal_naming(message: str, institution: str) -> str:
    """A refusal's message with the refusing institution's name, as the node claims it, appended."""
    return f'{message} [refused by institution "{institution}"]'


def refusing_institution(reason: object) -> str | None:
    """The institution a refusal's reason names itself as (the last such claim), or None."""
    found = _REFUSED_BY.findall(reason) if isinstance(reason, str) else []
    return found[-1] if found else None


def node_names(entries: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Node id -> (institution, ATTESTATION or CLAIM), over every entry of a ledger; a checked name wins."""
    checked: dict[str, str] = {}
    claimed: dict[str, str] = {}
    for entry in entries:
        body, kind = entry.get("body"), entry.get("kind")
        if not isinstance(body, Mapping):
            continue
        node = str(body.get("node_id"))
        if kind in (kinds.REPLY_ACCEPTED, kinds.WEIGHT_CLIPPED):
            _keep(checked, node, body.get("institution_id") or attested_name(body))
        elif kind == kinds.AGGREGATED:
            for each, name in zip(_list(body.get("nodes")), _list(body.get("institutions")), strict=False):
                _keep(checked, str(each), name)
        elif kind == kinds.REPLY_REJECTED:
            _keep(claimed, node, body.get("institution_id") or attested_name(body) or refusing_institution(body.get("reason")))
    names = {node: (name, CLAIM) for node, name in claimed.items()}
    names.update({node: (name, ATTESTATION) for node, name in checked.items()})
    return names


def attested_name(body: Mapping[str, Any]) -> str | None:
    """The institution_id of the attestation an entry holds, or None (no attestation, or one that does not parse)."""
    attestation = body.get("attestation")
    statement = attestation.get("statement") if isinstance(attestation, Mapping) else None
    try:
        fields = json.loads(statement) if isinstance(statement, str) else None
    except ValueError:
        return None
    name = fields.get("institution_id") if isinstance(fields, dict) else None
    return name if isinstance(name, str) else None


def _keep(names: dict[str, str], node: str, name: object) -> None:
    if isinstance(name, str) and name and node != "None":
        names.setdefault(node, name)


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
