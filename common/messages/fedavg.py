"""The FedAvg baseline's messages: the global weights Flower's FedAvg strategy sends, and the trained weights back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.errors import MessageFormatError
from common.messages.records import get_field, get_record, record_digest
from common.messages.timings import NodeTimings, attach_timings


@dataclass(frozen=True)
class TrainInstruction:
    """Server -> institution, FedAvg baseline only, as Flower's FedAvg strategy builds it: the global weights
    (`arrays`) and the round (`config`, `server-round`; absent when a caller sends weights alone: round 0)."""

    weights: ArrayRecord  # the global student's state dict
    server_round: int

    def to_record(self) -> RecordDict:
        return RecordDict({"arrays": self.weights, "config": ConfigRecord({"server-round": self.server_round})})

    @classmethod
    def from_record(cls, record: RecordDict) -> TrainInstruction:
        arrays = record.get("arrays")
        if not isinstance(arrays, ArrayRecord):
            raise MessageFormatError("fedavg: expected an ArrayRecord 'arrays' holding the global model")
        if "config" not in record:
            return cls(weights=arrays, server_round=0)
        config = get_record(record, "config", ConfigRecord)
        server_round = get_field(config, "config", "server-round", int)
        if server_round < 0:
            raise MessageFormatError(f"config: server-round must be >= 0, got {server_round}")
        return cls(weights=arrays, server_round=server_round)


@dataclass(frozen=True)
class TrainReply:
    """Institution -> server, FedAvg baseline only: the student's weights after local training, and counts.

    Flower's FedAvg averages the reply's one ArrayRecord weighted by `weight_key` of its one MetricRecord.
    """

    weights: ArrayRecord  # the trained state dict: the global model's names, shapes and dtypes
    num_examples: int  # size of the private partition it trained on: the weight in the average
    train_loss: float
    timings: NodeTimings | None = None  # seconds per phase on the node: outside the attested payload (timings.py)

    weight_key: ClassVar[str] = "num-examples"  # the strategy's `weighted_by_key`

    def to_record(self) -> RecordDict:
        record = RecordDict({
            "arrays": self.weights,
            "metrics": MetricRecord({self.weight_key: self.num_examples, "train-loss": float(self.train_loss)}),
        })
        return record if self.timings is None else attach_timings(record, self.timings)  # a ConfigRecord: Flower ignores it

    @classmethod
    def from_record(cls, record: RecordDict) -> TrainReply:
        """Parse and validate a reply as Flower's FedAvg reads it: exactly one ArrayRecord (`arrays`, numeric) and
        one MetricRecord (`metrics`, holding `num-examples` >= 1 and `train-loss`). Flower's own check of the
        replies would stop the run; this drops the one bad reply instead."""
        if len(record.array_records) != 1:
            raise MessageFormatError(f"fedavg reply: expected one ArrayRecord of trained weights, got {len(record.array_records)}")
        metric_records = list(record.metric_records.values())
        if len(metric_records) != 1 or cls.weight_key not in metric_records[0]:
            raise MessageFormatError(f"fedavg reply: expected one MetricRecord holding {cls.weight_key!r}")
        weights = get_record(record, "arrays", ArrayRecord)
        for name in weights.keys():
            _numeric(name, weights[name].dtype)
        metrics = get_record(record, "metrics", MetricRecord)
        num_examples = get_field(metrics, "metrics", cls.weight_key, int)
        if num_examples < 1:
            raise MessageFormatError(f"metrics: {cls.weight_key} must be >= 1, got {num_examples}")
        return cls(weights=weights, num_examples=num_examples, train_loss=get_field(metrics, "metrics", "train-loss", float),
                   timings=NodeTimings.from_record(record))


def weights_digest(weights: ArrayRecord) -> str:
    """sha256 of a set of weights, as a FedAvg reply's `arrays` record is digested (`record_digest`)."""
    return record_digest(RecordDict({"arrays": weights}))[0]


def _numeric(name: str, dtype: str) -> None:
    """Weights are numbers: a bool, int or float dtype (a BatchNorm's batch counter is int64)."""
    try:
        numeric = np.dtype(dtype).kind in "biuf"
    except (TypeError, ValueError):  # not a dtype numpy knows
        numeric = False
    if not numeric:
        raise MessageFormatError(f"record 'arrays': array {name!r} must hold numbers, got dtype {dtype!r}")
