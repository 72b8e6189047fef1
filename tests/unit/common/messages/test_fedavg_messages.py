"""Unit tests of common/messages/fedavg.py: the FedAvg baseline's `TrainInstruction` and `TrainReply` round-trip through Flower records,
and every way a reply can be malformed is a `MessageFormatError` that names the problem."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.errors import MessageFormatError
from common.messages import TrainInstruction, TrainReply


def trained(**changes) -> TrainReply:
    fields = dict(
        weights=ArrayRecord({
            "fc.weight": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),  # a BatchNorm's counter: int64
        }),
        num_examples=250, train_loss=0.75,
    )
    fields.update(changes)
    return TrainReply(**fields)


def test_train_reply_round_trips() -> None:
    # Prepare
    reply = trained()

    # Execute
    record = reply.to_record()
    parsed = TrainReply.from_record(record)

    # Assert
    assert set(record.keys()) == {"arrays", "metrics"}
    assert dict(record["metrics"]) == {"num-examples": 250, "train-loss": 0.75}  # what Flower's FedAvg reads
    assert (parsed.num_examples, parsed.train_loss) == (250, 0.75)
    assert list(parsed.weights.keys()) == ["fc.weight", "bn.num_batches_tracked"]
    assert np.array_equal(parsed.weights["fc.weight"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert parsed.weights["bn.num_batches_tracked"].numpy() == 7


def test_an_int_train_loss_is_accepted_as_a_float() -> None:
    # Prepare
    record = trained().to_record()
    record["metrics"] = MetricRecord({"num-examples": 250, "train-loss": 1})

    # Execute
    parsed = TrainReply.from_record(record)

    # Assert
    assert parsed.train_loss == 1.0 and isinstance(parsed.train_loss, float)


def put(key: str, value) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        record[key] = value
    return change


def drop(key: str) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        del record[key]
    return change


def strings(record: RecordDict) -> None:
    record["arrays"] = ArrayRecord({"fc.weight": Array(np.array(["x", "y"]))})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(drop("arrays"), "fedavg reply: expected one ArrayRecord of trained weights, got 0", id="no-weights"),
        pytest.param(put("more", ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})),
                     "fedavg reply: expected one ArrayRecord of trained weights, got 2", id="two-weights"),
        pytest.param(drop("metrics"), "fedavg reply: expected one MetricRecord holding 'num-examples'", id="no-metrics"),
        pytest.param(put("metrics", MetricRecord({"loss": 0.1})),
                     "fedavg reply: expected one MetricRecord holding 'num-examples'", id="no-weight-key"),
        pytest.param(put("more", MetricRecord({"num-examples": 3})),
                     "fedavg reply: expected one MetricRecord holding 'num-examples'", id="two-metrics"),
        pytest.param(lambda record: record.__setitem__("weights", record.pop("arrays")), "missing record 'arrays'", id="other-name"),
        pytest.param(put("metrics", MetricRecord({"num-examples": 0, "train-loss": 0.5})),
                     "metrics: num-examples must be >= 1, got 0", id="no-examples"),
        pytest.param(put("metrics", MetricRecord({"num-examples": 2.5, "train-loss": 0.5})),
                     "metrics: key 'num-examples' must be int, got float", id="float-examples"),
        pytest.param(put("metrics", MetricRecord({"num-examples": 250})), "metrics: missing key 'train-loss'", id="no-loss"),
        pytest.param(strings, "record 'arrays': array 'fc.weight' must hold numbers, got dtype '<U1'", id="strings"),
    ],
)
def test_malformed_train_reply_is_rejected(change: Callable[[RecordDict], None], expected: str) -> None:
    # Prepare
    record = trained().to_record()
    change(record)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        TrainReply.from_record(record)


def test_a_config_record_beside_the_weights_is_not_a_second_array_record() -> None:
    # Prepare: Flower's FedAvg sends its config as a ConfigRecord; a reply may echo one
    record = trained().to_record()
    record["config"] = ConfigRecord({"server-round": 1})

    # Execute
    parsed = TrainReply.from_record(record)

    # Assert
    assert parsed.num_examples == 250


def test_train_instruction_round_trips_as_flower_fedavg_sends_it() -> None:
    # Prepare
    weights = trained().weights
    record = RecordDict({"arrays": weights, "config": ConfigRecord({"server-round": 3})})  # FedAvg.configure_train's shape

    # Execute
    parsed = TrainInstruction.from_record(record)
    again = TrainInstruction.from_record(parsed.to_record())

    # Assert
    assert parsed.server_round == again.server_round == 3
    assert list(again.weights.keys()) == ["fc.weight", "bn.num_batches_tracked"]


def test_train_instruction_without_config_is_round_zero() -> None:
    # Execute
    parsed = TrainInstruction.from_record(RecordDict({"arrays": trained().weights}))

    # Assert
    assert parsed.server_round == 0


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param(lambda: RecordDict({}), "expected an ArrayRecord 'arrays'", id="no-weights"),
        pytest.param(lambda: RecordDict({"arrays": ConfigRecord({"x": 1})}), "expected an ArrayRecord 'arrays'", id="not-arrays"),
        pytest.param(lambda: RecordDict({"arrays": trained().weights, "config": ConfigRecord({})}), "missing key 'server-round'",
                     id="no-round"),
        pytest.param(lambda: RecordDict({"arrays": trained().weights, "config": ConfigRecord({"server-round": "1"})}),
                     "'server-round' must be int", id="round-text"),
        pytest.param(lambda: RecordDict({"arrays": trained().weights, "config": ConfigRecord({"server-round": -1})}),
                     "server-round must be >= 0", id="negative-round"),
    ],
)
def test_malformed_train_instructions_are_refused(record: Callable[[], RecordDict], expected: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        TrainInstruction.from_record(record())
