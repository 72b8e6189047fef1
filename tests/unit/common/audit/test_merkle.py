"""RFC 9162 Merkle trees (common.audit.merkle): the Certificate Transparency reference vectors, every proof of
every small tree verifies, and nothing altered does."""

from __future__ import annotations

import hashlib

import pytest

from common.audit.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)
from common.errors import AuditError

# RFC 6962's reference leaves and the root of each prefix (published test data, e.g. transparency-dev/merkle)
CT_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                        "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
CT_INCLUSION = {0: ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
                5: ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]}
LEAVES = [leaf_hash(f"entry {i}".encode()) for i in range(37)]


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH as RFC 9162 2.1.1 defines it, recursively."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


def test_the_reference_roots_and_inclusion_proofs() -> None:
    hashes = [leaf_hash(d) for d in CT_LEAVES]
    assert root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert [root(hashes[:n]).hex() for n in range(1, 9)] == CT_ROOTS
    for index, proof in CT_INCLUSION.items():
        assert [p.hex() for p in inclusion_proof(hashes, index)] == proof
        assert verify_inclusion(hashes[index], index, 8, [bytes.fromhex(p) for p in proof], bytes.fromhex(CT_ROOTS[7]))


@pytest.mark.parametrize("size", range(1, len(LEAVES) + 1))
def test_every_inclusion_proof_verifies_and_nothing_else_does(size: int) -> None:
    tree = LEAVES[:size]
    head = root(tree)
    assert head == reference_root(tree)
    for index in range(size):
        proof = inclusion_proof(tree, index)
        assert verify_inclusion(tree[index], index, size, proof, head)
        assert not verify_inclusion(leaf_hash(b"forged"), index, size, proof, head)
        if size > 1:
            assert not verify_inclusion(tree[index], (index + 1) % size, size, proof, head)
            assert not verify_inclusion(tree[index], index, size, proof[:-1], head)
            assert not verify_inclusion(tree[index], index, size, [b"\x00" * 32, *proof[1:]], head)


@pytest.mark.parametrize("second", range(1, len(LEAVES) + 1))
def test_every_consistency_proof_verifies_and_a_rewritten_history_does_not(second: int) -> None:
    new = root(LEAVES[:second])
    for first in range(0, second + 1):
        old = root(LEAVES[:first])
        proof = consistency_proof(LEAVES[:second], first)
        assert verify_consistency(first, second, old, new, proof), (first, second)
        if 0 < first < second:
            rewritten = [*LEAVES[: first - 1], leaf_hash(b"rewritten")]  # the same size, another last entry
            assert not verify_consistency(first, second, root(rewritten), new, proof)
            assert not verify_consistency(first, second, old, root([*LEAVES[:second - 1], leaf_hash(b"x")]), proof)
            assert not verify_consistency(first, second, old, new, proof[:-1])


def test_a_rollback_is_no_extension() -> None:
    assert not verify_consistency(5, 4, root(LEAVES[:5]), root(LEAVES[:4]), [])
    with pytest.raises(AuditError, match="size 6 is not within a tree of 4 entries"):
        consistency_proof(LEAVES[:4], 6)
    with pytest.raises(AuditError, match="entry 4 is not in a tree of 4 entries"):
        inclusion_proof(LEAVES[:4], 4)
