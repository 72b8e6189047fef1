"""Messages of the secure-aggregation round's first half: signed keys up, roster down, signed bundles up, inbox down,
complaints up. The masked answer and the consistency and unmasking steps are in secagg_unmask.py.

Node ids travel as decimal strings wherever a config record holds them (Flower's ids are uint64, past int64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.errors import MessageFormatError
from common.messages.records import get_field, get_record
from common.secagg.protocol import Roster, RosterEntry

SETUP_TYPE = "query.secagg_setup"
SHARES_TYPE = "query.secagg_shares"
INBOX_TYPE = "query.secagg_inbox"


@dataclass(frozen=True)
class SecAggSetup:
    """Server -> institution: make this round's two X25519 key pairs and send the public halves."""

    round: int

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg-setup": ConfigRecord({"round": self.round})})

    @classmethod
    def from_record(cls, record: RecordDict) -> SecAggSetup:
        return cls(get_field(get_record(record, "secagg-setup", ConfigRecord), "secagg-setup", "round", int))


@dataclass(frozen=True)
class SecAggKeys:
    """Institution -> server: public X25519 keys for pairwise masks and for encrypting shares, signed by the
    institution's identity key (common/secagg/signatures.py keys_statement)."""

    round: int
    mask_key: bytes
    share_key: bytes
    institution: str = ""
    signature: str = ""

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg-keys": ConfigRecord({
            "round": self.round, "mask-key": self.mask_key, "share-key": self.share_key,
            "institution": self.institution, "signature": self.signature,
        })})

    @classmethod
    def from_record(cls, record: RecordDict, round_: int) -> SecAggKeys:
        config = get_record(record, "secagg-keys", ConfigRecord)
        keys = cls(get_field(config, "secagg-keys", "round", int), get_field(config, "secagg-keys", "mask-key", bytes),
                   get_field(config, "secagg-keys", "share-key", bytes), get_field(config, "secagg-keys", "institution", str),
                   get_field(config, "secagg-keys", "signature", str))
        if keys.round != round_ or len(keys.mask_key) != 32 or len(keys.share_key) != 32:
            raise MessageFormatError(f"secagg-keys: expected round {round_} and two 32-byte keys")
        return keys


@dataclass(frozen=True)
class SecAggRoster:
    """Server -> institution: who takes part, their signed keys, the threshold (the share request, and beside the
    soft-label query, where it names the members U whose shares every member opened)."""

    round: int
    threshold: int
    weighted: bool  # each institution multiplies by its num-examples (rule `weighted`), else by 1
    roster: Roster

    def to_record(self) -> RecordDict:
        nodes = sorted(self.roster)
        return RecordDict({
            "secagg": ConfigRecord({"round": self.round, "threshold": self.threshold, "weighted": self.weighted,
                                    "institutions": [self.roster[n].institution for n in nodes],
                                    "signatures": [self.roster[n].signature for n in nodes]}),
            "secagg-roster": ArrayRecord({
                "nodes": Array(np.array(nodes, dtype=np.uint64)),
                "indices": Array(np.array([self.roster[n].index for n in nodes], dtype=np.int64)),
                "mask-keys": Array(np.array([list(self.roster[n].mask_key) for n in nodes], dtype=np.uint8).reshape(-1, 32)),
                "share-keys": Array(np.array([list(self.roster[n].share_key) for n in nodes], dtype=np.uint8).reshape(-1, 32)),
            }),
        })

    @classmethod
    def from_record(cls, record: RecordDict) -> SecAggRoster | None:
        """The roster when the query carries one (a secure-aggregation round), else None."""
        if "secagg" not in record:
            return None
        config = get_record(record, "secagg", ConfigRecord)
        arrays = get_record(record, "secagg-roster", ArrayRecord)
        try:
            nodes, indices = arrays["nodes"].numpy(), arrays["indices"].numpy()
            mask_keys, share_keys = arrays["mask-keys"].numpy(), arrays["share-keys"].numpy()
        except (KeyError, TypeError, ValueError) as error:
            raise MessageFormatError(f"secagg-roster: unreadable ({error})") from None
        n = len(nodes)
        if (indices.shape != (n,) or indices.dtype.kind not in "iu" or mask_keys.shape != (n, 32) or share_keys.shape != (n, 32)
                or mask_keys.dtype != np.uint8 or share_keys.dtype != np.uint8 or nodes.dtype != np.uint64):
            raise MessageFormatError("secagg-roster: expected nodes (n,) uint64, indices (n,) int, keys (n, 32) uint8")
        institutions, signatures = _strings(config, "institutions", n), _strings(config, "signatures", n)
        roster = {int(node): RosterEntry(int(i), bytes(m), bytes(s), name, signature)
                  for node, i, m, s, name, signature in zip(nodes, indices, mask_keys, share_keys, institutions, signatures,
                                                            strict=True)}
        result = cls(get_field(config, "secagg", "round", int), get_field(config, "secagg", "threshold", int),
                     get_field(config, "secagg", "weighted", bool), roster)
        if len(set(int(i) for i in indices)) != n or any(int(i) < 1 for i in indices) or not 2 <= result.threshold <= max(n, 2):
            raise MessageFormatError(f"secagg: indices must be distinct positive Shamir points and the threshold in "
                                     f"[2, {n}], got {result.threshold}")
        return result


@dataclass(frozen=True)
class SecAggBundles:
    """Institution -> server (relayed): one sealed bundle of shares for every roster member, each signed by its
    sender (signatures.bundle_statement), and a commitment to the self seed (protocol.seed_commitment)."""

    round: int
    bundles: dict[int, bytes]  # destination node -> AES-GCM bundle of its shares of b and c
    signatures: dict[int, str]  # destination node -> the sender's signature of that bundle
    commitment: bytes

    def to_record(self) -> RecordDict:
        return RecordDict({
            "secagg-bundles": ConfigRecord({"round": self.round, "commitment": self.commitment}),
            "bundles": ConfigRecord({str(node): bundle for node, bundle in sorted(self.bundles.items())}),
            "bundle-signatures": ConfigRecord({str(node): sig for node, sig in sorted(self.signatures.items())}),
        })

    @classmethod
    def from_record(cls, record: RecordDict, round_: int, roster: Roster) -> SecAggBundles:
        config = get_record(record, "secagg-bundles", ConfigRecord)
        if get_field(config, "secagg-bundles", "round", int) != round_:
            raise MessageFormatError(f"secagg-bundles: expected round {round_}")
        commitment = get_field(config, "secagg-bundles", "commitment", bytes)
        if len(commitment) != 32:
            raise MessageFormatError("secagg-bundles: the commitment must be 32 bytes (a sha256)")
        bundles, signatures = node_map(record, "bundles", bytes), node_map(record, "bundle-signatures", str)
        if sorted(bundles) != sorted(roster) or sorted(signatures) != sorted(roster):
            raise MessageFormatError("bundles: expected one share bundle for every node of the roster, each with its signature")
        return cls(round_, bundles, signatures, commitment)


@dataclass(frozen=True)
class SecAggInbox:
    """Server -> institution: the bundles sealed for it by every member whose shares went out, with their senders'
    signatures; it opens them all before anyone masks."""

    round: int
    bundles: dict[int, bytes]  # source node -> the bundle it sealed for this node
    signatures: dict[int, str]  # source node -> its signature of that bundle

    def to_record(self) -> RecordDict:
        return RecordDict({
            "secagg-inbox": ConfigRecord({"round": self.round}),
            "bundles": ConfigRecord({str(node): bundle for node, bundle in sorted(self.bundles.items())}),
            "bundle-signatures": ConfigRecord({str(node): sig for node, sig in sorted(self.signatures.items())}),
        })

    @classmethod
    def from_record(cls, record: RecordDict) -> SecAggInbox:
        round_ = get_field(get_record(record, "secagg-inbox", ConfigRecord), "secagg-inbox", "round", int)
        bundles, signatures = node_map(record, "bundles", bytes), node_map(record, "bundle-signatures", str)
        if sorted(bundles) != sorted(signatures):
            raise MessageFormatError("secagg-inbox: every bundle needs its sender's signature")
        return cls(round_, bundles, signatures)


@dataclass(frozen=True)
class SecAggComplaints:
    """Institution -> server: the senders whose signed bundles did not open for it (empty: all opened)."""

    round: int
    accused: list[int]

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg-complaints": ConfigRecord({"round": self.round,
                                                              "accused": [str(n) for n in sorted(self.accused)]})})

    @classmethod
    def from_record(cls, record: RecordDict, round_: int, sources: list[int]) -> SecAggComplaints:
        config = get_record(record, "secagg-complaints", ConfigRecord)
        if get_field(config, "secagg-complaints", "round", int) != round_:
            raise MessageFormatError(f"secagg-complaints: expected round {round_}")
        accused = node_list(config, "secagg-complaints", "accused")
        if not set(accused) <= set(sources):
            raise MessageFormatError("secagg-complaints: a complaint may name only senders of the bundles relayed")
        return cls(round_, accused)


def node_list(config: ConfigRecord, where: str, key: str) -> list[int]:
    """A list of node ids (decimal strings) of a config record, distinct."""
    value = config.get(key)
    if not isinstance(value, list):
        raise MessageFormatError(f"{where}: {key!r} must be a list of node ids, got {type(value).__name__}")
    try:
        nodes = [int(n) for n in value if isinstance(n, str) and n.isdigit()]
    except ValueError:
        nodes = []
    if len(nodes) != len(value) or len(set(nodes)) != len(nodes):
        raise MessageFormatError(f"{where}: {key!r} must be a list of distinct node ids (decimal strings)")
    return nodes


def node_map(record: RecordDict, key: str, kind: type) -> dict[int, Any]:
    """Config record `key` as node id -> value of type `kind`."""
    config = get_record(record, key, ConfigRecord)
    if not all(node.isdigit() for node in config.keys()):
        raise MessageFormatError(f"{key}: keys must be node ids (decimal strings)")
    return {int(node): get_field(config, key, node, kind) for node in config.keys()}


def _strings(config: ConfigRecord, key: str, n: int) -> list[str]:
    value = config.get(key)
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, str) for v in value):
        raise MessageFormatError(f"secagg: {key!r} must list one string per roster node ({n})")
    return [str(v) for v in value]
