"""FedMD digest messages: the consensus sent down to an institution and the losses it sends back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.errors import MessageFormatError
from common.messages.records import get_array, get_field, get_record
from common.messages.soft_labels import SoftLabelQuery, validate_soft_labels

DIGEST_TYPE = "train.digest"


@dataclass(frozen=True)
class DigestInstruction:
    """Server -> institution (FedMD): learn toward the consensus on these public samples, then revisit."""

    round: int
    fingerprint: str
    temperature: float
    sample_ids: np.ndarray  # (m,) int64 indices into the public set
    consensus: np.ndarray  # (m, C) float32 rows on the simplex; float16 on the wire
    digest_epochs: int
    revisit_epochs: int

    def to_record(self) -> RecordDict:
        return RecordDict({
            "digest": ConfigRecord({
                "round": self.round, "fingerprint": self.fingerprint, "temperature": float(self.temperature),
                "digest-epochs": self.digest_epochs, "revisit-epochs": self.revisit_epochs,
            }),
            "consensus": ArrayRecord({
                "ids": Array(np.asarray(self.sample_ids, dtype=np.int64)),
                "probs": Array(np.asarray(self.consensus, dtype=np.float16)),
            }),
        })

    @classmethod
    def from_record(cls, record: RecordDict) -> DigestInstruction:
        config = get_record(record, "digest", ConfigRecord)
        ids = get_array(record, "consensus", "ids")
        probs = get_array(record, "consensus", "probs")
        if ids.ndim != 1 or ids.dtype != np.int64 or probs.ndim != 2 or probs.shape[0] != len(ids):
            raise MessageFormatError(f"consensus: expected ids (m,) int64 and probs (m, C), got {ids.shape}, {probs.shape}")
        as_query = SoftLabelQuery(0, "", 1.0, "float16", probs.shape[1], ids, False)
        digest = cls(
            round=get_field(config, "digest", "round", int),
            fingerprint=get_field(config, "digest", "fingerprint", str),
            temperature=get_field(config, "digest", "temperature", float),
            sample_ids=ids, consensus=validate_soft_labels({"probs": probs}, as_query),
            digest_epochs=get_field(config, "digest", "digest-epochs", int),
            revisit_epochs=get_field(config, "digest", "revisit-epochs", int),
        )
        if not digest.temperature > 0 or digest.digest_epochs < 0 or digest.revisit_epochs < 0:
            raise MessageFormatError("digest: temperature must be > 0 and epochs >= 0")
        return digest


@dataclass(frozen=True)
class DigestReply:
    """Institution -> server: losses of the digest and revisit steps (nothing else leaves)."""

    round: int
    digest_loss: float
    revisit_loss: float

    def to_record(self) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({
            "round": self.round, "digest-loss": float(self.digest_loss), "revisit-loss": float(self.revisit_loss),
        })})

    @classmethod
    def from_record(cls, record: RecordDict) -> DigestReply:
        metrics = get_record(record, "metrics", MetricRecord)
        return cls(
            round=get_field(metrics, "metrics", "round", int),
            digest_loss=get_field(metrics, "metrics", "digest-loss", float),
            revisit_loss=get_field(metrics, "metrics", "revisit-loss", float),
        )
