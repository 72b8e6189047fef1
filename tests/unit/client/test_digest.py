"""Unit tests of FedMD's digest step: the `DigestInstruction` / `DigestReply` messages
(common/messages.py), the node's check of the public set (`check_public`, client/client_app.py) and
the teacher's `digest_round` (client/teacher.py) on a tiny digits site."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

from client.client_app import check_public
from client.site import Site
from client.teacher import digest_round
from common.config import RunConfig, default_run_config
from common.errors import FingerprintMismatch, MessageFormatError, PolicyViolation
from common.losses import distillation_loss
from common.messages import DigestInstruction, DigestReply
from common.models.inputs import images_to_tensor
from common.models.registry import build_model
from common.models.training import predict_probs
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint

FINGERPRINT = "3f2a" + "0" * 60
OTHER_FINGERPRINT = "9c1e" + "f" * 60
M, C = 6, 10


def make_consensus(m: int = M, c: int = C, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(c), size=m).astype(np.float32)  # (m, c) rows sum to 1


def make_instruction(**changes: Any) -> DigestInstruction:
    fields = dict(
        round=2, fingerprint=FINGERPRINT, temperature=3.0, sample_ids=np.arange(20, 20 + M, dtype=np.int64),
        consensus=make_consensus(), digest_epochs=2, revisit_epochs=1,
    )
    fields.update(changes)
    return DigestInstruction(**fields)


# ---------------------------------------------------------------------------------------------------
# Messages: round-trips
# ---------------------------------------------------------------------------------------------------


def test_digest_instruction_round_trips_with_a_float16_consensus() -> None:
    # Prepare
    sent = make_instruction()

    # Execute
    record = sent.to_record()
    received = DigestInstruction.from_record(record)

    # Assert
    assert record["consensus"]["probs"].numpy().dtype == np.float16  # half the bytes on the wire
    assert (received.round, received.fingerprint, received.temperature) == (2, FINGERPRINT, 3.0)
    assert (received.digest_epochs, received.revisit_epochs) == (2, 1)
    assert received.sample_ids.dtype == np.int64
    np.testing.assert_array_equal(received.sample_ids, sent.sample_ids)
    assert received.consensus.dtype == np.float32
    assert received.consensus.shape == (M, C)
    np.testing.assert_allclose(received.consensus, sent.consensus, atol=1e-3, rtol=0)


def test_digest_instruction_with_zero_epochs_round_trips() -> None:
    # Prepare
    sent = make_instruction(digest_epochs=0, revisit_epochs=0)

    # Execute
    received = DigestInstruction.from_record(sent.to_record())

    # Assert
    assert (received.digest_epochs, received.revisit_epochs) == (0, 0)


@pytest.mark.parametrize(("digest_loss", "revisit_loss"), [(0.25, 1.5), (float("nan"), 0.75), (float("nan"), float("nan"))])
def test_digest_reply_round_trips_including_nan_for_skipped_steps(digest_loss: float, revisit_loss: float) -> None:
    # Prepare
    sent = DigestReply(round=4, digest_loss=digest_loss, revisit_loss=revisit_loss)

    # Execute
    received = DigestReply.from_record(sent.to_record())

    # Assert
    assert received.round == 4
    for got, want in ((received.digest_loss, digest_loss), (received.revisit_loss, revisit_loss)):
        assert (math.isnan(got) and math.isnan(want)) or got == want


# ---------------------------------------------------------------------------------------------------
# Messages: rejections
# ---------------------------------------------------------------------------------------------------


def set_probs(probs: np.ndarray) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        record["consensus"]["probs"] = Array(probs)
    return change


def set_ids(ids: np.ndarray) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        record["consensus"]["ids"] = Array(ids)
    return change


def set_config(key: str, value: Any) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        record["digest"][key] = value
    return change


def drop(path: tuple[str, ...]) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        if len(path) == 1:
            del record[path[0]]
        else:
            del record[path[0]][path[1]]
    return change


def off_simplex() -> np.ndarray:
    probs = make_consensus().astype(np.float16)
    probs[1] *= 1.5  # row sums to 1.5
    return probs


def with_nan() -> np.ndarray:
    probs = make_consensus().astype(np.float16)
    probs[2, 3] = np.nan
    return probs


def with_negative() -> np.ndarray:
    probs = make_consensus().astype(np.float16)
    probs[0, :2] = [-0.5, probs[0, 0] + probs[0, 1] + 0.5]
    return probs


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(set_probs(off_simplex()), "1 rows do not sum to 1", id="row-off-simplex"),
        pytest.param(set_probs(np.full((M, C), 1.0, dtype=np.float16)), "rows do not sum to 1", id="logits-like"),
        pytest.param(set_probs(with_nan()), "1 rows hold NaN or inf", id="nan"),
        pytest.param(set_probs(with_negative()), "negative values", id="negative"),
        pytest.param(
            set_probs(make_consensus(M + 1).astype(np.float16)),
            r"consensus: expected ids \(m,\) int64 and probs \(m, C\), got \(6,\), \(7, 10\)", id="more-rows-than-ids",
        ),
        pytest.param(set_ids(np.arange(M - 1, dtype=np.int64)), r"got \(5,\), \(6, 10\)", id="fewer-ids-than-rows"),
        pytest.param(set_ids(np.arange(M, dtype=np.float64)), "consensus: expected ids", id="float-ids"),
        pytest.param(set_ids(np.arange(M * 2, dtype=np.int64).reshape(M, 2)), "consensus: expected ids", id="2d-ids"),
        pytest.param(set_probs(np.full(M, 1.0, dtype=np.float16)), "consensus: expected ids", id="1d-probs"),
        pytest.param(set_probs(make_consensus()), "expects dtype float16", id="float32-on-the-wire"),
        pytest.param(drop(("digest",)), "missing record 'digest'", id="no-digest-record"),
        pytest.param(drop(("consensus",)), "missing record 'consensus'", id="no-consensus-record"),
        pytest.param(drop(("consensus", "probs")), "missing array 'probs'", id="no-probs"),
        pytest.param(drop(("consensus", "ids")), "missing array 'ids'", id="no-ids"),
        pytest.param(drop(("digest", "temperature")), "digest: missing key 'temperature'", id="no-temperature"),
        pytest.param(drop(("digest", "round")), "digest: missing key 'round'", id="no-round"),
        pytest.param(drop(("digest", "fingerprint")), "digest: missing key 'fingerprint'", id="no-fingerprint"),
        pytest.param(drop(("digest", "digest-epochs")), "digest: missing key 'digest-epochs'", id="no-digest-epochs"),
        pytest.param(drop(("digest", "revisit-epochs")), "digest: missing key 'revisit-epochs'", id="no-revisit-epochs"),
        pytest.param(set_config("digest-epochs", -1), "epochs >= 0", id="negative-digest-epochs"),
        pytest.param(set_config("revisit-epochs", -3), "epochs >= 0", id="negative-revisit-epochs"),
        pytest.param(set_config("digest-epochs", 1.5), "key 'digest-epochs' must be int", id="float-epochs"),
        pytest.param(set_config("temperature", 0.0), "temperature must be > 0", id="zero-temperature"),
        pytest.param(set_config("temperature", -2.0), "temperature must be > 0", id="negative-temperature"),
        pytest.param(set_config("temperature", float("nan")), "temperature must be > 0", id="nan-temperature"),
        pytest.param(set_config("temperature", "hot"), "key 'temperature' must be float", id="text-temperature"),
    ],
)
def test_malformed_digest_instruction_is_rejected(change: Callable[[RecordDict], None], expected: str) -> None:
    # Prepare
    record = make_instruction().to_record()
    change(record)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        DigestInstruction.from_record(record)


def test_a_record_of_another_kind_is_not_a_digest_instruction() -> None:
    # Prepare
    record = RecordDict({"digest": MetricRecord({"round": 1}), "consensus": make_instruction().to_record()["consensus"]})

    # Execute / Assert
    with pytest.raises(MessageFormatError, match="record 'digest': expected ConfigRecord, got MetricRecord"):
        DigestInstruction.from_record(record)


def reply_metrics(**values: Any) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(values)})


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param(RecordDict({}), "missing record 'metrics'", id="empty"),
        pytest.param(reply_metrics(**{"round": 1, "revisit-loss": 0.5}), "metrics: missing key 'digest-loss'", id="no-digest-loss"),
        pytest.param(reply_metrics(**{"round": 1, "digest-loss": 0.5}), "metrics: missing key 'revisit-loss'", id="no-revisit-loss"),
        pytest.param(reply_metrics(**{"digest-loss": 0.5, "revisit-loss": 0.5}), "metrics: missing key 'round'", id="no-round"),
        pytest.param(
            RecordDict({"metrics": ConfigRecord({"round": 1, "digest-loss": 0.5, "revisit-loss": 0.5})}),
            "expected MetricRecord", id="config-record",
        ),
    ],
)
def test_malformed_digest_reply_is_rejected(record: RecordDict, expected: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        DigestReply.from_record(record)


# ---------------------------------------------------------------------------------------------------
# The node's check of the instruction against what it holds
# ---------------------------------------------------------------------------------------------------


def test_check_public_accepts_a_matching_instruction() -> None:
    # Execute / Assert: no exception
    assert check_public(FINGERPRINT, 10, np.array([0, 7, 99], dtype=np.int64), FINGERPRINT, 10, 100) is None
    assert check_public(FINGERPRINT, 10, np.array([], dtype=np.int64), FINGERPRINT, 10, 100) is None


def test_check_public_refuses_another_public_set() -> None:
    # Execute / Assert
    with pytest.raises(FingerprintMismatch, match=r"server has 3f2a00000000\.\.\., this node has 9c1effffffff\.\.\."):
        check_public(FINGERPRINT, 10, np.arange(3, dtype=np.int64), OTHER_FINGERPRINT, 10, 100)


def test_check_public_refuses_another_label_space() -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match="label space mismatch: server expects 10 classes, this node has 9"):
        check_public(FINGERPRINT, 10, np.arange(3, dtype=np.int64), FINGERPRINT, 9, 100)


@pytest.mark.parametrize("bad_id", [-1, 100, 2**40])
def test_check_public_refuses_ids_outside_the_public_set(bad_id: int) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=r"sample-ids: indices must lie in \[0, 100\)"):
        check_public(FINGERPRINT, 10, np.array([3, bad_id], dtype=np.int64), FINGERPRINT, 10, 100)


# ---------------------------------------------------------------------------------------------------
# digest_round on a tiny digits site
# ---------------------------------------------------------------------------------------------------

TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def site() -> Site:
    split = load_split("digits", "", 400, 42)
    return Site(
        partition_id=1, private=split.private.subset(np.arange(300)), public=split.public, test=split.test,
        fingerprint=public_fingerprint(split.public),
    )


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return RunConfig.from_run_config({
        **default_run_config(), "dataset": "digits", "public-size": 400, "teacher-lr": 0.005, "teacher-batch-size": 32,
    })


def sharpened_consensus(model: torch.nn.Module, site: Site, ids: np.ndarray) -> np.ndarray:
    """The teacher's own predictions pulled toward the true labels: 0.3 p + 0.7 one-hot (rows sum to 1)."""
    probs = predict_probs(model, site.public.images[ids], TEMPERATURE)  # (m, 10)
    onehot = np.eye(10, dtype=np.float32)[site.public.labels[ids]]
    return (0.3 * probs + 0.7 * onehot).astype(np.float32)


def agreement(model: torch.nn.Module, site: Site, ids: np.ndarray, consensus: np.ndarray) -> float:
    return float((predict_probs(model, site.public.images[ids], TEMPERATURE).argmax(1) == consensus.argmax(1)).mean())


def kd_to(model: torch.nn.Module, site: Site, ids: np.ndarray, consensus: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(images_to_tensor(site.public.images[ids]))
    return float(distillation_loss(logits, torch.from_numpy(consensus), TEMPERATURE))


def received(site: Site, ids: np.ndarray, consensus: np.ndarray, digest_epochs: int, revisit_epochs: int) -> DigestInstruction:
    """The instruction as the node sees it: through the wire (float16 consensus, float32 after decoding)."""
    sent = DigestInstruction(1, site.fingerprint, TEMPERATURE, ids, consensus, digest_epochs, revisit_epochs)
    return DigestInstruction.from_record(sent.to_record())


def test_digest_epochs_raise_the_teachers_agreement_with_the_consensus(site: Site, cfg: RunConfig) -> None:
    # Prepare
    teacher = build_model("cnn-small", 10, (8, 8), seed=0)
    ids = np.arange(0, 400, 2, dtype=np.int64)
    consensus = sharpened_consensus(teacher, site, ids)
    instruction = received(site, ids, consensus, digest_epochs=4, revisit_epochs=0)
    agreement_before, kd_before = agreement(teacher, site, ids, consensus), kd_to(teacher, site, ids, consensus)

    # Execute
    digest_loss, revisit_loss = digest_round(teacher, cfg, site, instruction, rounds_trained=1)

    # Assert
    assert agreement(teacher, site, ids, consensus) >= agreement_before + 0.2
    assert kd_to(teacher, site, ids, consensus) < kd_before
    assert math.isfinite(digest_loss)
    assert math.isnan(revisit_loss)


def test_zero_epochs_leave_the_teacher_unchanged_and_report_nan(site: Site, cfg: RunConfig) -> None:
    # Prepare
    teacher = build_model("cnn-small", 10, (8, 8), seed=0)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    ids = np.arange(50, dtype=np.int64)
    instruction = received(site, ids, sharpened_consensus(teacher, site, ids), digest_epochs=0, revisit_epochs=0)

    # Execute
    digest_loss, revisit_loss = digest_round(teacher, cfg, site, instruction, rounds_trained=0)

    # Assert
    assert math.isnan(digest_loss) and math.isnan(revisit_loss)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_revisit_epochs_train_on_the_private_data(site: Site, cfg: RunConfig) -> None:
    # Prepare
    teacher = build_model("cnn-small", 10, (8, 8), seed=0)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    ids = np.arange(50, dtype=np.int64)
    instruction = received(site, ids, sharpened_consensus(teacher, site, ids), digest_epochs=0, revisit_epochs=1)

    # Execute
    digest_loss, revisit_loss = digest_round(teacher, cfg, site, instruction, rounds_trained=0)

    # Assert
    assert math.isnan(digest_loss)
    assert math.isfinite(revisit_loss) and revisit_loss > 0
    assert any(not torch.equal(value, before[name]) for name, value in teacher.state_dict().items())


def test_digest_round_itself_refuses_a_revisit_under_privacy(site: Site, cfg: RunConfig) -> None:
    # Prepare: the site policy is the first guard (client.enforce); the training function is the last
    private_cfg = dataclasses.replace(cfg, privacy="dp-sgd")
    teacher = build_model("cnn-small", 10, (8, 8), seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids = np.arange(8, dtype=np.int64)

    # Execute / Assert
    with pytest.raises(PolicyViolation, match=r"^site-policy: max-revisit-epochs = 0 \(always, under privacy \"dp-sgd\"\)"):
        digest_round(teacher, private_cfg, site, received(site, ids, make_consensus(8), 1, 2), 0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # nothing trained
