"""Merkle trees over a ledger's entries, hashed as RFC 9162 (Certificate Transparency 2.0), section 2.1.

The leaves are the ledger's entries in order, each as its canonical JSON line. Hashing keeps leaves and
inner nodes apart by a one-byte prefix:

    MTH({})     = SHA-256()
    leaf(d)     = SHA-256(0x00 || d)
    MTH(D[n])   = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n])),  k the largest power of two < n

An **inclusion proof** shows that entry i is in the tree of size n with a given root; a **consistency
proof** shows that the tree of size m is a prefix of the tree of size n (nothing before m was changed,
dropped or reordered). Both are lists of sibling hashes, built and checked by the algorithms of RFC 9162
sections 2.1.3 and 2.1.4, written here from the RFC's text. Functions take leaf hashes (bytes), so a
caller hashes each entry once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from common.errors import AuditError

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH of the tree whose leaf hashes are `leaves` (EMPTY_ROOT for none)."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:  # pairing left to right, an odd last node carried up, gives RFC 9162's split
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = paired + ([level[-1]] if len(level) % 2 else [])
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]) of RFC 9162 2.1.3.1: the siblings from leaf `index` up to the root."""
    if not 0 <= index < len(leaves):
        raise AuditError(f"inclusion proof: entry {index} is not in a tree of {len(leaves)} entries")
    return _path(index, leaves)


def _path(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    if len(leaves) <= 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return _path(index, leaves[:k]) + [root(leaves[k:])]
    return _path(index - k, leaves[k:]) + [root(leaves[:k])]


def consistency_proof(leaves: Sequence[bytes], size: int) -> list[bytes]:
    """PROOF(size, D[n]) of RFC 9162 2.1.4.1: that the first `size` leaves are a prefix of all of them."""
    if not 0 <= size <= len(leaves):
        raise AuditError(f"consistency proof: size {size} is not within a tree of {len(leaves)} entries")
    if size in (0, len(leaves)):
        return []
    return _subproof(size, leaves, True)


def _subproof(size: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    if size == len(leaves):
        return [] if whole else [root(leaves)]
    k = _split(len(leaves))
    if size <= k:
        return _subproof(size, leaves[:k], whole) + [root(leaves[k:])]
    return _subproof(size - k, leaves[k:], False) + [root(leaves[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """RFC 9162 2.1.3.2: whether `proof` shows leaf hash `leaf` at `index` in the tree of `size` with `expected_root`."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == expected_root


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2: whether `proof` shows the tree of size `first` (root `first_root`) is a prefix of the
    tree of size `second` (root `second_root`)."""
    if not 0 <= first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof  # the empty tree is a prefix of every tree
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the first root is itself a node of the second tree
        path = [first_root, *path]
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == first_root and sr == second_root


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)
