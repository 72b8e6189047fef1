"""Unit tests of the FedAvg baseline's client step (client/fedavg.py) on a tiny digits site."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import client_app
from client.fedavg import fedavg_train
from client.site import Site
from common.audit import kinds
from common.audit.attestation import check_attestation
from common.audit.keys import load_allow_list
from common.config import RunConfig, default_run_config
from common.errors import MessageFormatError
from common.messages import TrainInstruction, TrainReply, read_attestation, record_digest
from common.models.registry import build_model
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint
from simulations.provision import provision_sites

RUN_ID = 2**63 - 25  # Flower's run ids are 64-bit


@pytest.fixture(scope="module")
def site() -> Site:
    split = load_split("digits", "", 400, 42)
    return Site(
        partition_id=2, private=split.private.subset(np.arange(250)), public=split.public, test=split.test,
        fingerprint=public_fingerprint(split.public),
    )


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return RunConfig.from_run_config({
        **default_run_config(), "dataset": "digits", "public-size": 400, "method": "fedavg",
        "student-model": "cnn-student", "fedavg-local-epochs": 1,
    })


def train(content: RecordDict, cfg: RunConfig, site: Site, server_round: int) -> RecordDict:
    """What the ClientApp's train handler does: parse the instruction (here at `server_round`), then train."""
    instruction = dataclasses.replace(TrainInstruction.from_record(content), server_round=server_round)
    return fedavg_train(instruction, cfg, site)


def global_weights(name: str = "cnn-student", num_classes: int = 10) -> dict[str, torch.Tensor]:
    return build_model(name, num_classes, (8, 8), seed=0).state_dict()


def test_trains_on_fedavgs_own_schedule_not_the_teachers(site: Site, cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: teachers at 10 epochs, lr 0.01, batches of 256; FedAvg at 2 epochs, lr 0.003, batches of 50
    from client import fedavg as fedavg_module
    calls: list[dict[str, Any]] = []
    real = fedavg_module.train_supervised
    monkeypatch.setattr(fedavg_module, "train_supervised", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    own = dataclasses.replace(cfg, local_epochs=10, teacher_lr=0.01, teacher_batch_size=256,
                              fedavg_local_epochs=2, fedavg_lr=0.003, fedavg_batch_size=50)
    content = RecordDict({"arrays": ArrayRecord(global_weights()), "config": ConfigRecord({"server-round": 1})})

    # Execute
    train(content, own, site, server_round=1)

    # Assert
    [call] = calls
    assert (call["epochs"], call["lr"], call["batch_size"]) == (2, 0.003, 50)


def test_returns_trained_weights_of_the_same_shapes_and_counts(site: Site, cfg: RunConfig) -> None:
    # Prepare
    weights = global_weights()
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord({"server-round": 1})})

    # Execute
    reply = train(content, cfg, site, server_round=1)

    # Assert
    assert set(reply.keys()) == {"arrays", "metrics"}
    assert isinstance(reply["arrays"], ArrayRecord) and isinstance(reply["metrics"], MetricRecord)
    trained = reply["arrays"].to_torch_state_dict()
    assert list(trained) == list(weights)
    for name, value in weights.items():
        assert trained[name].shape == value.shape, name
        assert trained[name].dtype == value.dtype, name
        assert not torch.equal(trained[name], value), f"{name} did not change"
    metrics = reply["metrics"]
    assert metrics["num-examples"] == len(site.private) == 250
    assert math.isfinite(metrics["train-loss"]) and metrics["train-loss"] > 0
    assert TrainReply.from_record(reply).num_examples == 250  # the reply passes the server's schema check


def test_the_global_weights_in_the_message_are_not_modified(site: Site, cfg: RunConfig) -> None:
    # Prepare
    weights = global_weights()
    arrays = ArrayRecord(weights)
    content = RecordDict({"arrays": arrays})

    # Execute
    train(content, cfg, site, server_round=1)

    # Assert
    for name, value in arrays.to_torch_state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_the_same_round_trains_reproducibly(site: Site, cfg: RunConfig) -> None:
    # Prepare
    content = RecordDict({"arrays": ArrayRecord(global_weights())})

    # Execute
    first = train(content, cfg, site, server_round=3)["arrays"].to_torch_state_dict()
    second = train(content, cfg, site, server_round=3)["arrays"].to_torch_state_dict()

    # Assert
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        pytest.param(lambda: ArrayRecord(global_weights("cnn-large")), "size mismatch", id="cnn-large"),
        pytest.param(lambda: ArrayRecord(global_weights("mlp")), "Missing key", id="mlp"),
        pytest.param(lambda: ArrayRecord(global_weights("cnn-student", num_classes=9)), "size mismatch", id="9-classes"),
        pytest.param(lambda: ArrayRecord({}), "Missing key", id="empty"),
        pytest.param(lambda: ArrayRecord({**global_weights(), "extra.weight": torch.zeros(2)}), "Unexpected key", id="extra-key"),
    ],
)
def test_weights_of_another_architecture_are_a_message_format_error(site: Site, cfg: RunConfig, arrays, expected: str) -> None:
    # Prepare
    content = RecordDict({"arrays": arrays()})

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=rf"fedavg: global weights do not fit cnn-student: (.|\n)*{expected}"):
        train(content, cfg, site, server_round=1)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(RecordDict({}), id="empty"),
        pytest.param(RecordDict({"weights": ArrayRecord(global_weights())}), id="other-name"),
        pytest.param(RecordDict({"arrays": ConfigRecord({"x": 1})}), id="not-an-array-record"),
    ],
)
def test_missing_global_weights_are_a_message_format_error(site: Site, cfg: RunConfig, content: RecordDict) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match="fedavg: expected an ArrayRecord 'arrays' holding the global model"):
        train(content, cfg, site, server_round=1)


def test_non_numeric_weights_are_a_message_format_error(site: Site, cfg: RunConfig) -> None:
    # Prepare
    arrays = {name: Array(value.numpy()) for name, value in global_weights().items()}
    arrays["head.3.bias"] = Array(np.array(["x"] * 10))
    content = RecordDict({"arrays": ArrayRecord(arrays)})

    # Execute / Assert
    with pytest.raises(MessageFormatError, match="fedavg: global weights"):
        train(content, cfg, site, server_round=1)


def test_the_clientapp_signs_the_trained_weights_and_logs_the_release(tmp_path: Path, memory_grid: Any) -> None:
    # Prepare: a simulated institution with its key, as `fedstill simulate` provisions it, and a FedAvg round-2 question
    mapping = {**default_run_config(), "dataset": "digits", "public-size": 400, "method": "fedavg", "num-clients": 2, "min-clients": 2,
               "student-model": "cnn-student", "local-epochs": 1, **provision_sites(tmp_path, 2)}
    allow_list = load_allow_list(mapping["allow-list"])
    context = Context(RUN_ID, 7, {"partition-id": 1, "num-partitions": 2}, RecordDict(), mapping)
    grid = memory_grid(lambda message: client_app.fedavg(message, context), nodes=[7])
    question = Message(TrainInstruction(ArrayRecord(global_weights()), server_round=2).to_record(), dst_node_id=7,
                       message_type="train", group_id="2")

    # Execute
    [reply] = grid.send_and_receive([question])

    # Assert: the attestation holds for this run, round, node, query and the exact bytes sent, and says weights leave
    assert not reply.has_error(), reply.error.reason
    content = reply.content
    attestation = read_attestation(content)
    assert attestation is not None
    payload_sha256, payload_bytes = record_digest(content)
    fields = check_attestation(attestation, allow_list, {
        "run_id": str(RUN_ID), "round": 2, "node_id": "7", "institution_id": "institution-1",
        "query_sha256": record_digest(question.content)[0], "payload_sha256": payload_sha256, "payload_bytes": payload_bytes,
    }, "attestation")
    assert fields["payload"]["kind"] == kinds.FEDAVG_PAYLOAD
    assert set(fields["payload"]["arrays"]) == set(global_weights())
    assert fields["data_categories"][0] == "model weights trained on private data (FedAvg baseline)"
    assert TrainReply.from_record(content).num_examples > 0  # still the reply Flower's FedAvg reads
    log = Path(mapping["sites-dir"]) / "institution-1" / "release-log.jsonl"
    releases = [json.loads(line) for line in log.read_text().splitlines()][1:]
    assert [r["body"]["attestation"] for r in releases] == [attestation.as_dict()]
