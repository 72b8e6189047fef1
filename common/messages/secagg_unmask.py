"""Messages of the secure-aggregation round's second half: masked soft labels up, survivor set down and signed up,
the survivors' signatures down, unmasking shares up. The keys, roster and bundles are in secagg.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.errors import FingerprintMismatch, MessageFormatError
from common.messages.records import get_field, get_record
from common.messages.secagg import node_list, node_map
from common.messages.timings import NodeTimings, attach_timings
from common.secagg.protocol import SHARE_BYTES

CONSISTENCY_TYPE = "query.secagg_consistency"
UNMASK_TYPE = "query.secagg_unmask"
KIND_BYTE = {"b": b"b", "c": b"c"}


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
    timings: NodeTimings | None = None  # seconds per phase on the node: outside the attested payload (timings.py)

    def to_record(self) -> RecordDict:
        record = RecordDict({
            "masked": ArrayRecord({"y": Array(np.asarray(self.masked, dtype=np.uint64))}),
            "release": ConfigRecord({"round": self.round, "fingerprint": self.fingerprint, "codec": "secagg"}),
            "metrics": MetricRecord({
                "train-loss": float(self.train_loss), "teacher-accuracy": float(self.teacher_accuracy),
                "teacher-params": self.teacher_params, "teacher-rounds": self.teacher_rounds,
            }),
        })
        return record if self.timings is None else attach_timings(record, self.timings)

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
            teacher_rounds=get_field(metrics, "metrics", "teacher-rounds", int), timings=NodeTimings.from_record(record),
        )


@dataclass(frozen=True)
class SecAggConsistency:
    """Server -> surviving institution: the survivors S, those whose masked vectors arrived; sign what you see."""

    round: int
    survivors: list[int]

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg-consistency": ConfigRecord({"round": self.round,
                                                               "survivors": [str(n) for n in sorted(self.survivors)]})})

    @classmethod
    def from_record(cls, record: RecordDict) -> SecAggConsistency:
        config = get_record(record, "secagg-consistency", ConfigRecord)
        return cls(get_field(config, "secagg-consistency", "round", int), node_list(config, "secagg-consistency", "survivors"))


@dataclass(frozen=True)
class SecAggSignature:
    """Surviving institution -> server: its signature of (U, S) as it was shown them (signatures.survivors_statement)."""

    round: int
    signature: str

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg-signature": ConfigRecord({"round": self.round, "signature": self.signature})})

    @classmethod
    def from_record(cls, record: RecordDict, round_: int) -> SecAggSignature:
        config = get_record(record, "secagg-signature", ConfigRecord)
        if get_field(config, "secagg-signature", "round", int) != round_:
            raise MessageFormatError(f"secagg-signature: expected round {round_}")
        return cls(round_, get_field(config, "secagg-signature", "signature", str))


@dataclass(frozen=True)
class SecAggUnmask:
    """Server -> surviving institution: the survivors S, and the survivors' signatures of (U, S); at least the
    threshold of them must verify on the sets this institution signed before it gives any share."""

    round: int
    survivors: list[int]
    signatures: dict[int, str]  # signer node -> its signature of (U, S)

    def to_record(self) -> RecordDict:
        return RecordDict({
            "secagg-unmask": ConfigRecord({"round": self.round, "survivors": [str(n) for n in sorted(self.survivors)]}),
            "signatures": ConfigRecord({str(node): sig for node, sig in sorted(self.signatures.items())}),
        })

    @classmethod
    def from_record(cls, record: RecordDict) -> SecAggUnmask:
        config = get_record(record, "secagg-unmask", ConfigRecord)
        return cls(get_field(config, "secagg-unmask", "round", int), node_list(config, "secagg-unmask", "survivors"),
                   node_map(record, "signatures", str))


@dataclass(frozen=True)
class SecAggShares:
    """Surviving institution -> server: the b-share of each survivor and the c-share of each dropped node."""

    round: int
    shares: dict[int, tuple[str, int]]  # source node -> ("b" | "c", share)

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg-shares": ConfigRecord({
            "round": self.round,
            **{str(node): KIND_BYTE[kind] + share.to_bytes(SHARE_BYTES, "big") for node, (kind, share) in sorted(self.shares.items())},
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
            if len(raw) != SHARE_BYTES + 1 or raw[:1] not in (b"b", b"c") or not key.isdigit():
                raise MessageFormatError(f"secagg-shares: share {key!r} must be a kind byte and {SHARE_BYTES} bytes")
            shares[int(key)] = (raw[:1].decode(), int.from_bytes(raw[1:], "big"))
        return cls(round_, shares)
