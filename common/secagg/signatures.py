"""What an institution signs in a secure-aggregation round, and how every peer checks it against its allow-list.

Against an honest-but-curious server the masks alone suffice; against an active one they do not: a server
that shows a node a roster of keys it made itself, or different survivor sets to different nodes, could
unmask that node. So each institution signs, with its long-term Ed25519 identity (the key its releases are
signed with, client/release.py), three things, and every peer checks each signature against its *own* copy
of the consortium's allow-list, never against a list the server sends:

- its round keys (`keys_statement`): a roster entry with a key no allow-listed institution signed is refused;
- each share bundle it seals (`bundle_statement`): a bundle that does not open is then provably its sender's;
- the set it masked with and the survivor set it was shown (`survivors_statement`): a node reveals shares
  only after seeing a threshold of such signatures on the very sets it signed itself.

Each statement is RFC 8785 canonical JSON, bound to the run and the round, so no signature is replayed into
another round, run, node or purpose.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from common.audit.canonical import canonical
from common.audit.keys import verify_signature
from common.errors import AuditError
from common.secagg.masking import public_key_problem
from common.secagg.protocol import Roster

KEYS_SCHEMA = "fedstill.secagg-keys/1"
BUNDLE_SCHEMA = "fedstill.secagg-bundle/1"
SURVIVORS_SCHEMA = "fedstill.secagg-survivors/1"


def keys_statement(run_id: int, round_: int, node: int, institution: str, mask_key: bytes, share_key: bytes) -> bytes:
    """What an institution signs of its round keys: they are this node's, in this run and round."""
    return canonical({"schema": KEYS_SCHEMA, "run_id": str(run_id), "round": int(round_), "node_id": str(node),
                      "institution_id": institution, "mask_key": mask_key.hex(), "share_key": share_key.hex()})


def bundle_statement(run_id: int, round_: int, source: int, destination: int, bundle: bytes) -> bytes:
    """What a sender signs of one sealed bundle: it sealed exactly these bytes for `destination`."""
    return canonical({"schema": BUNDLE_SCHEMA, "run_id": str(run_id), "round": int(round_), "source": str(source),
                      "destination": str(destination), "bundle_sha256": hashlib.sha256(bundle).hexdigest()})


def survivors_statement(run_id: int, round_: int, shared: Iterable[int], survivors: Iterable[int]) -> bytes:
    """What a survivor signs in the consistency step: the set U it masked with and the survivors S it was shown."""
    return canonical({"schema": SURVIVORS_SCHEMA, "run_id": str(run_id), "round": int(round_),
                      "shared": [str(n) for n in sorted(shared)], "survivors": [str(n) for n in sorted(survivors)]})


def check_signature(allow_list: Mapping[str, str], institution: str, signature: str, statement: bytes, where: str,
                    check: str) -> None:
    """AuditError (with ledger check `check`) unless `institution` is on `allow_list` and signed `statement`."""
    if not signature or not institution:
        raise AuditError(f"{where}: unsigned (every institution signs with its identity key)", check)
    public = allow_list.get(institution)
    if public is None:
        raise AuditError(f"{where}: signed as {institution!r}, which is not on the allow-list", check)
    try:
        verify_signature(public, signature, statement, f"{where}: signature of {institution!r}")
    except AuditError as error:
        raise AuditError(str(error), check) from None


def check_roster(roster: Roster, allow_list: Mapping[str, str], run_id: int, round_: int) -> None:
    """A node's checks of the roster it is asked to give shares to (AuditError naming the first problem):
    indices are the ranks of the sorted node ids, every key is a valid X25519 key, all keys are distinct,
    every entry is signed by an institution on this node's allow-list, and no institution holds two seats."""
    if [roster[n].index for n in sorted(roster)] != list(range(1, len(roster) + 1)):
        raise AuditError("secure aggregation: the roster's indices are not 1..n in node order", "secagg")
    keys = [key for entry in roster.values() for key in (entry.mask_key, entry.share_key)]
    if len(set(keys)) != len(keys):
        raise AuditError("secure aggregation: the roster repeats a public key", "secagg-key")
    seats: dict[str, int] = {}
    for node, entry in sorted(roster.items()):
        for name, key in (("mask", entry.mask_key), ("share", entry.share_key)):
            problem = public_key_problem(key)
            if problem:
                raise AuditError(f"secure aggregation: node {node}'s {name} key in the roster is {problem}; "
                                 "a coordinator must drop such a node", "secagg-key")
        statement = keys_statement(run_id, round_, node, entry.institution, entry.mask_key, entry.share_key)
        check_signature(allow_list, entry.institution, entry.signature, statement,
                        f"secure aggregation: node {node}'s round keys", "secagg-key")
        if entry.institution in seats:
            raise AuditError(f"secure aggregation: institution {entry.institution!r} holds two seats in the roster "
                             f"(nodes {seats[entry.institution]} and {node})", "secagg-key")
        seats[entry.institution] = node


def count_signatures(signatures: Mapping[int, str], roster: Roster, allow_list: Mapping[str, str], statement: bytes,
                     among: Iterable[int]) -> int:
    """How many members of `among` (pinned roster members) validly signed `statement`; bad ones do not count."""
    valid = 0
    for node in set(among):
        if node not in signatures or node not in roster:
            continue
        try:
            check_signature(allow_list, roster[node].institution, signatures[node], statement, "consistency", "secagg")
        except AuditError:
            continue
        valid += 1
    return valid

