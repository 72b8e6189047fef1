"""The coordinator's checks of a secure-aggregation round beyond each reply's schema: the protocol's own signatures, the
keys' validity, and the disputes over share bundles — so that a faulty peer is dropped and named, not the round.

Each check takes the judged exchange of one step (server/exchange.py) and refuses the replies that fail it before the
ledger records them, with the check's name: "secagg-key" (a key not valid, or not signed by the institution that sent
it), "secagg-bundle" (a bundle its sender did not sign), "secagg-signature" (a survivor set signed wrongly).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from common.errors import AuditError
from common.messages import SecAggBundles, SecAggKeys, SecAggShares, SecAggSignature
from common.secagg.masking import public_key_problem
from common.secagg.protocol import Roster
from common.secagg.signatures import bundle_statement, check_signature, keys_statement, survivors_statement
from server.exchange import Exchange


def refuse_bad_keys(keys: Exchange[SecAggKeys], allow_list: Mapping[str, str], bindings: Mapping[int, str], run_id: int,
                    round_: int) -> None:
    """Refuse keys that are not valid X25519 keys (small order, non-canonical), not signed by an allow-listed
    institution, signed by another institution than the one whose attestation the reply carries, or sent by two
    nodes (their masks would not be theirs alone)."""
    for node, k in sorted(keys.accepted.items()):
        try:
            for name, key in (("mask", k.mask_key), ("share", k.share_key)):
                problem = public_key_problem(key)
                if problem:
                    raise AuditError(f"secure aggregation: its {name} key is {problem}", "secagg-key")
            check_signature(allow_list, k.institution, k.signature,
                            keys_statement(run_id, round_, node, k.institution, k.mask_key, k.share_key),
                            "secure aggregation: its round keys", "secagg-key")
            if bindings.get(node, k.institution) != k.institution:
                raise AuditError(f"secure aggregation: its round keys are signed by {k.institution!r}, its reply by "
                                 f"{bindings[node]!r}", "secagg-key")
        except AuditError as error:
            _refuse(keys, node, error)
    seen: dict[bytes, list[int]] = {}
    for node, k in keys.accepted.items():
        for key in (k.mask_key, k.share_key):
            seen.setdefault(key, []).append(node)
    for node in sorted({n for nodes in seen.values() if len(nodes) > 1 for n in nodes}):
        _refuse(keys, node, AuditError("secure aggregation: a public key this node sent was also sent by another node",
                                       "secagg-key"))


def refuse_unsigned_bundles(bundles: Exchange[SecAggBundles], roster: Roster, allow_list: Mapping[str, str], run_id: int,
                            round_: int) -> None:
    """Refuse a sender whose bundles are not all signed by it: relayed, they could not be told from altered ones."""
    for node, reply in sorted(bundles.accepted.items()):
        try:
            for destination, bundle in sorted(reply.bundles.items()):
                check_signature(allow_list, roster[node].institution, reply.signatures[destination],
                                bundle_statement(run_id, round_, node, destination, bundle),
                                f"secure aggregation: its bundle for node {destination}", "secagg-bundle")
        except AuditError as error:
            _refuse(bundles, node, error)


def settle_disputes(complaints: Mapping[int, Iterable[int]]) -> list[int]:
    """The nodes to drop so that no dispute over share bundles remains (accuser -> the senders it accuses).

    Honest institutions never dispute each other (a bundle is signed by its sender and relayed unaltered), so one
    side of every dispute is faulty: drop the node in the most disputes until none remains (a greedy vertex
    cover), on a tie the accused, whose signed bundle is the evidence, then the smallest node id. A peer whose
    bundles do not open is dropped; a peer that falsely accuses two or more is dropped itself; one that falsely
    accuses a single peer costs that peer the round (as a coordinator dropping it would), and the ledger keeps both.
    """
    edges = {(accuser, accused) for accuser, accused_nodes in complaints.items() for accused in accused_nodes}
    dropped: list[int] = []
    while edges:
        disputes, accusations = Counter[int](), Counter[int]()
        for accuser, accused in edges:
            disputes.update({accuser, accused})
            accusations[accused] += 1
        worst = max(disputes, key=lambda n: (disputes[n], accusations[n], -n))
        dropped.append(worst)
        edges = {(a, b) for a, b in edges if worst not in (a, b)}
    return dropped


def dispute_reason(node: int, complaints: Mapping[int, Iterable[int]]) -> str:
    """Why `node` was dropped by `settle_disputes`, for the ledger."""
    accusers = sorted(a for a, accused in complaints.items() if node in accused and a != node)
    accused = sorted(b for b in complaints.get(node, ()) if b != node)
    parts = [f"nodes {accusers} could not open the share bundles it signed for them"] if accusers else []
    parts += [f"it could not open the signed bundles of nodes {accused}"] if accused else []
    if node in complaints.get(node, ()):
        parts.append("its own bundle did not open for it")
    return ("secure aggregation: in disputes over share bundles, " + "; ".join(parts)
            + "; one side of every dispute is faulty, and this node was in the most")


def refuse_bad_signatures(signatures: Exchange[SecAggSignature], roster: Roster, allow_list: Mapping[str, str],
                          run_id: int, round_: int, shared: list[int], survivors: list[int]) -> None:
    """Refuse a survivor whose signature of (U, S) does not verify: its peers would not count it either."""
    statement = survivors_statement(run_id, round_, shared, survivors)
    for node, reply in sorted(signatures.accepted.items()):
        try:
            check_signature(allow_list, roster[node].institution, reply.signature, statement,
                            "secure aggregation: its signature of the survivor set", "secagg-signature")
        except AuditError as error:
            _refuse(signatures, node, error)


def expected_shares(shares: SecAggShares, shared: list[int], survivors: list[int]) -> SecAggShares:
    """The unmasking answer must hold the b-share of every survivor and the c-share of every other member of U."""
    expected = {node: "b" if node in survivors else "c" for node in shared}
    if {node: kind for node, (kind, _) in shares.shares.items()} != expected:
        raise AuditError("secure aggregation: the answer must hold the self-seed share of every survivor and the "
                         "mask-key share of every other member, and nothing else", "format")
    return shares


def _refuse(outcome: Exchange[Any], node: int, error: AuditError) -> None:
    outcome.accepted.pop(node, None)
    outcome.reject(node, f"{type(error).__name__}: {error}", error.check)
