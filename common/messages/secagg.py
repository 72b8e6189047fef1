"""Messages of the secure-aggregation round: keys up, roster down, masked soft labels up, shares up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.errors import FingerprintMismatch, MessageFormatError
from common.messages.records import get_field, get_record
from common.secagg.protocol import Roster, RosterEntry

SETUP_TYPE = "query.secagg_setup"
SHARES_TYPE = "query.secagg_shares"
UNMASK_TYPE = "query.secagg_unmask"
KIND_BYTE = {"b": b"b", "c": b"c"}


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
    """Institution -> server: public X25519 keys for pairwise masks and for encrypting shares."""

    round: int
    mask_key: bytes
    share_key: bytes

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg-keys": ConfigRecord({"round": self.round, "mask-key": self.mask_key, "share-key": self.share_key})})

    @classmethod
    def from_record(cls, record: RecordDict, round_: int) -> SecAggKeys:
        config = get_record(record, "secagg-keys", ConfigRecord)
        keys = cls(get_field(config, "secagg-keys", "round", int), get_field(config, "secagg-keys", "mask-key", bytes),
                   get_field(config, "secagg-keys", "share-key", bytes))
        if keys.round != round_ or len(keys.mask_key) != 32 or len(keys.share_key) != 32:
            raise MessageFormatError(f"secagg-keys: expected round {round_} and two 32-byte keys")
        return keys


@dataclass(frozen=True)
class SecAggRoster:
    """Server -> institution: who takes part, their keys, the threshold (the share request, and beside the
    soft-label query, where it names the institutions that distributed their shares)."""

    round: int
    threshold: int
    weighted: bool  # each institution multiplies by its num-examples (rule `weighted`), else by 1
    roster: Roster

    def to_record(self) -> RecordDict:
        nodes = sorted(self.roster)
        return RecordDict({
            "secagg": ConfigRecord({"round": self.round, "threshold": self.threshold, "weighted": self.weighted}),
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
        if n and sorted(int(i) for i in indices) != list(range(1, n + 1)) and min(int(i) for i in indices) < 1:
            raise MessageFormatError("secagg-roster: indices must be positive Shamir points")
        roster = {int(node): RosterEntry(int(i), bytes(m), bytes(s))
                  for node, i, m, s in zip(nodes, indices, mask_keys, share_keys, strict=True)}
        result = cls(get_field(config, "secagg", "round", int), get_field(config, "secagg", "threshold", int),
                     get_field(config, "secagg", "weighted", bool), roster)
        if len(set(int(i) for i in indices)) != n or not 2 <= result.threshold <= max(n, 2):
            raise MessageFormatError(f"secagg: indices must be distinct and threshold in [2, {n}], got {result.threshold}")
        return result


@dataclass(frozen=True)
class SecAggBundles:
    """Institution -> server (relayed): one sealed bundle of shares for every roster member."""

    round: int
    bundles: dict[int, bytes]  # destination node -> AES-GCM bundle of its shares of b and c

    def to_record(self) -> RecordDict:
        return RecordDict({
            "secagg-bundles": ConfigRecord({"round": self.round}),
            "bundles": ConfigRecord({str(node): bundle for node, bundle in sorted(self.bundles.items())}),
        })

    @classmethod
    def from_record(cls, record: RecordDict, round_: int, roster: Roster) -> SecAggBundles:
        if get_field(get_record(record, "secagg-bundles", ConfigRecord), "secagg-bundles", "round", int) != round_:
            raise MessageFormatError(f"secagg-bundles: expected round {round_}")
        bundles = get_record(record, "bundles", ConfigRecord)
        if sorted(bundles.keys()) != sorted(str(node) for node in roster):
            raise MessageFormatError("bundles: expected one share bundle for every node of the roster")
        return cls(round_, {int(node): get_field(bundles, "bundles", node, bytes) for node in bundles.keys()})


@dataclass(frozen=True)
class MaskedReply:
    """Institution -> server under secure aggregation: the masked vector, and training figures.

    `masked` is uint64 of length m*C + 1: w * soft labels, flattened, then w (the weight), all masked.
    Alone it is uniformly random; only the sum over institutions can be opened.
    """

    round: int
    fingerprint: str
    masked: np.ndarray
    train_loss: float
    teacher_accuracy: float
    teacher_params: int
    teacher_rounds: int

    def to_record(self) -> RecordDict:
        return RecordDict({
            "masked": ArrayRecord({"y": Array(np.asarray(self.masked, dtype=np.uint64))}),
            "release": ConfigRecord({"round": self.round, "fingerprint": self.fingerprint, "codec": "secagg"}),
            "metrics": MetricRecord({
                "train-loss": float(self.train_loss), "teacher-accuracy": float(self.teacher_accuracy),
                "teacher-params": self.teacher_params, "teacher-rounds": self.teacher_rounds,
            }),
        })

    @classmethod
    def from_record(cls, record: RecordDict, round_: int, fingerprint: str, length: int) -> MaskedReply:
        release, metrics = get_record(record, "release", ConfigRecord), get_record(record, "metrics", MetricRecord)
        if get_field(release, "release", "fingerprint", str) != fingerprint:
            raise FingerprintMismatch("public set fingerprint mismatch: the node must hold the same public set")
        if get_field(release, "release", "round", int) != round_ or release.get("codec") != "secagg":
            raise MessageFormatError(f"release: expected round {round_} with codec 'secagg'")
        arrays = get_record(record, "masked", ArrayRecord)
        masked = arrays["y"].numpy() if "y" in arrays else None
        if masked is None or masked.dtype != np.uint64 or masked.shape != (length,):
            raise MessageFormatError(f"masked: expected uint64 of shape ({length},)")
        return cls(
            round=round_, fingerprint=fingerprint, masked=masked,
            train_loss=get_field(metrics, "metrics", "train-loss", float),
            teacher_accuracy=get_field(metrics, "metrics", "teacher-accuracy", float),
            teacher_params=get_field(metrics, "metrics", "teacher-params", int),
            teacher_rounds=get_field(metrics, "metrics", "teacher-rounds", int),
        )


@dataclass(frozen=True)
class SecAggUnmask:
    """Server -> surviving institution: who survived, who dropped, and the bundles addressed to you."""

    round: int
    survivors: list[int]
    dropped: list[int]
    bundles: dict[int, bytes]  # source node -> the bundle it sealed for this node

    def to_record(self) -> RecordDict:
        return RecordDict({
            "secagg-unmask": ConfigRecord({"round": self.round, "survivors": [str(n) for n in self.survivors],
                                           "dropped": [str(n) for n in self.dropped]}),
            "bundles": ConfigRecord({str(node): bundle for node, bundle in sorted(self.bundles.items())}),
        })

    @classmethod
    def from_record(cls, record: RecordDict) -> SecAggUnmask:
        config, bundles = get_record(record, "secagg-unmask", ConfigRecord), get_record(record, "bundles", ConfigRecord)
        try:
            survivors = [int(n) for n in _list(config, "survivors")]
            dropped = [int(n) for n in _list(config, "dropped")]
        except (TypeError, ValueError):
            raise MessageFormatError("secagg-unmask: survivors and dropped must be lists of node ids") from None
        return cls(get_field(config, "secagg-unmask", "round", int), survivors, dropped,
                   {int(node): get_field(bundles, "bundles", node, bytes) for node in bundles.keys()})


def _list(config: ConfigRecord, key: str) -> list[Any]:
    value = config.get(key)
    if not isinstance(value, list):
        raise MessageFormatError(f"secagg-unmask: survivors and dropped must be lists of node ids, {key!r} is {type(value).__name__}")
    return value


@dataclass(frozen=True)
class SecAggShares:
    """Surviving institution -> server: the b-share of each survivor and the c-share of each dropped node."""

    round: int
    shares: dict[int, tuple[str, int]]  # source node -> ("b" | "c", share)

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg-shares": ConfigRecord({
            "round": self.round,
            **{str(node): KIND_BYTE[kind] + share.to_bytes(66, "big") for node, (kind, share) in sorted(self.shares.items())},
        })})

    @classmethod
    def from_record(cls, record: RecordDict, round_: int) -> SecAggShares:
        config = get_record(record, "secagg-shares", ConfigRecord)
        if get_field(config, "secagg-shares", "round", int) != round_:
            raise MessageFormatError(f"secagg-shares: expected round {round_}")
        shares: dict[int, tuple[str, int]] = {}
        for key in config.keys():
            if key == "round":
                continue
            raw = get_field(config, "secagg-shares", key, bytes)
            if len(raw) != 67 or raw[:1] not in (b"b", b"c") or not key.isdigit():
                raise MessageFormatError(f"secagg-shares: share {key!r} must be a kind byte and 66 bytes")
            shares[int(key)] = (raw[:1].decode(), int.from_bytes(raw[1:], "big"))
        return cls(round_, shares)

