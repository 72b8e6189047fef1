"""Unit tests of common/messages.py and common/codecs.py (and the ClientApp's `check_query`).

Round-trips through Flower records, and every way a query or reply can be malformed: each rejection
is a `MessageFormatError` whose message names the problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from client.client_app import check_query
from common.codecs import decode, encode, simplex_tolerance
from common.errors import FingerprintMismatch, MessageFormatError
from common.messages import SoftLabelQuery, SoftLabelReply, record_nbytes

FINGERPRINT = "3f2a" + "0" * 60  # sha256 hex of the server's public set
OTHER_FINGERPRINT = "9c1e" + "f" * 60
M, C = 4, 10  # queried samples, classes


def make_query(codec: str = "float16", m: int = M, c: int = C, **changes) -> SoftLabelQuery:
    fields = dict(
        round=3, fingerprint=FINGERPRINT, temperature=3.0, codec=codec, num_classes=c,
        sample_ids=np.arange(10, 10 + m, dtype=np.int64), evaluate_teacher=False,
    )
    fields.update(changes)
    return SoftLabelQuery(**fields)


def make_probs(m: int = M, c: int = C, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(c), size=m).astype(np.float32)  # (m, c) rows sum to 1


def make_reply(query: SoftLabelQuery, probs: np.ndarray | None = None, **changes) -> SoftLabelReply:
    fields = dict(
        round=query.round, fingerprint=query.fingerprint, codec=query.codec,
        soft_labels=make_probs(len(query.sample_ids), query.num_classes) if probs is None else probs,
        num_examples=1234, train_loss=0.42, teacher_accuracy=-1.0, teacher_params=105_866, teacher_rounds=3,
    )
    fields.update(changes)
    return SoftLabelReply(**fields)


# ---------------------------------------------------------------------------------------------------
# Round-trips
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("evaluate_teacher", [False, True])
def test_query_round_trips(evaluate_teacher: bool) -> None:
    # Prepare
    query = make_query(evaluate_teacher=evaluate_teacher, sample_ids=np.array([7, 0, 99], dtype=np.int64))

    # Execute
    parsed = SoftLabelQuery.from_record(query.to_record())

    # Assert
    assert (parsed.round, parsed.fingerprint, parsed.temperature, parsed.codec, parsed.num_classes) == (
        3, FINGERPRINT, 3.0, "float16", 10,
    )
    assert parsed.evaluate_teacher is evaluate_teacher
    assert parsed.sample_ids.dtype == np.int64
    np.testing.assert_array_equal(parsed.sample_ids, [7, 0, 99])


def test_query_with_no_sample_ids_round_trips() -> None:
    # Prepare
    query = make_query(m=0)

    # Execute
    parsed = SoftLabelQuery.from_record(query.to_record())

    # Assert
    assert parsed.sample_ids.shape == (0,)


def test_query_converts_int_sample_ids_and_int_temperature() -> None:
    # Prepare
    query = make_query(temperature=2, sample_ids=np.array([1, 2], dtype=np.int32))

    # Execute
    parsed = SoftLabelQuery.from_record(query.to_record())

    # Assert
    assert parsed.temperature == 2.0 and isinstance(parsed.temperature, float)
    assert parsed.sample_ids.dtype == np.int64


def test_float32_reply_round_trips_exactly() -> None:
    # Prepare
    query = make_query("float32")
    reply = make_reply(query)

    # Execute
    parsed = SoftLabelReply.from_record(reply.to_record(), query)

    # Assert
    assert parsed.soft_labels.dtype == np.float32
    np.testing.assert_array_equal(parsed.soft_labels, reply.soft_labels)
    assert (parsed.round, parsed.fingerprint, parsed.codec) == (3, FINGERPRINT, "float32")
    assert (parsed.num_examples, parsed.teacher_params) == (1234, 105_866)
    assert (parsed.train_loss, parsed.teacher_accuracy) == (pytest.approx(0.42), -1.0)


def test_float16_reply_round_trips_within_half_an_ulp() -> None:
    # Prepare
    query = make_query("float16")
    reply = make_reply(query)

    # Execute
    parsed = SoftLabelReply.from_record(reply.to_record(), query)

    # Assert: float16 rounding of a value in [0, 1] is at most half an ulp near 1 (2^-11)
    assert parsed.soft_labels.dtype == np.float32
    np.testing.assert_allclose(parsed.soft_labels, reply.soft_labels, rtol=0, atol=2**-11)
    np.testing.assert_array_equal(parsed.soft_labels, reply.soft_labels.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("codec", ["float16", "float32"])
def test_codec_encode_decode(codec: str) -> None:
    # Prepare
    probs = make_probs()

    # Execute
    wire = encode(probs, codec)
    back = decode(wire, codec)

    # Assert
    assert wire.dtype == np.dtype(codec) and wire.flags.c_contiguous
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, probs, atol=2**-11)


@pytest.mark.parametrize("call", [lambda: encode(make_probs(), "int8"), lambda: decode(make_probs(), "int8")])
def test_unknown_codec_is_refused(call: Callable[[], np.ndarray]) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match="unknown codec 'int8'; known codecs: float32, float16"):
        call()


def test_simplex_tolerance_golden_values() -> None:
    # Execute / Assert: C ulps at 1, at least 1e-4
    assert simplex_tolerance("float16", 10) == pytest.approx(10 * 2**-10)
    assert simplex_tolerance("float32", 10) == 1e-4


# ---------------------------------------------------------------------------------------------------
# Reply rejections
# ---------------------------------------------------------------------------------------------------


def probs_with(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[SoftLabelQuery], RecordDict]:
    """A reply record whose soft labels are `change(valid probabilities)`."""
    return lambda query: make_reply(query, probs=change(make_probs())).to_record()


def set_at(row: int, col: int, value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(probs: np.ndarray) -> np.ndarray:
        probs[row, col] = value
        return probs
    return change


def negative_row(probs: np.ndarray) -> np.ndarray:
    probs[2] = 0.0
    probs[2, :2] = [1.25, -0.25]  # sums to 1 but is not a distribution
    return probs


@pytest.mark.parametrize("codec", ["float16", "float32"])
@pytest.mark.parametrize(
    ("make_record", "expected"),
    [
        pytest.param(probs_with(set_at(1, 2, math.nan)), r"soft-labels: 1 rows hold NaN or inf; send finite", id="nan"),
        pytest.param(probs_with(set_at(0, 0, math.inf)), r"soft-labels: 1 rows hold NaN or inf", id="inf"),
        pytest.param(probs_with(set_at(3, 9, -math.inf)), r"soft-labels: 1 rows hold NaN or inf", id="-inf"),
        pytest.param(probs_with(lambda p: p[:, :9]), r"soft-labels: expected shape \(4, 10\), got \(4, 9\)", id="too-few-classes"),
        pytest.param(probs_with(lambda p: np.vstack([p, p[:1]])), r"expected shape \(4, 10\), got \(5, 10\)", id="too-many-rows"),
        pytest.param(probs_with(lambda p: p.reshape(-1)), r"expected shape \(4, 10\), got \(40,\)", id="flattened"),
        pytest.param(
            probs_with(lambda p: np.random.default_rng(1).uniform(0.5, 5.0, size=p.shape).astype(np.float32)),
            r"soft-labels: \d+ rows do not sum to 1 .*send softmax probabilities, not logits", id="logits",
        ),
        pytest.param(probs_with(lambda p: p * 0.9), r"soft-labels: 4 rows do not sum to 1", id="scaled"),
        pytest.param(probs_with(negative_row), r"soft-labels: negative values \(min -0.25\); send probabilities", id="negative"),
    ],
)
def test_bad_soft_labels_are_rejected(codec: str, make_record, expected: str) -> None:
    # Prepare
    query = make_query(codec)
    record = make_record(query)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        SoftLabelReply.from_record(record, query)


@pytest.mark.parametrize(
    ("codec", "wire_dtype"),
    [("float16", np.float32), ("float32", np.float16), ("float32", np.float64), ("float16", np.dtype(">f2"))],
)
def test_wire_dtype_other_than_the_codecs_is_rejected(codec: str, wire_dtype) -> None:
    # Prepare
    query = make_query(codec)
    record = make_reply(query).to_record()
    wire = make_probs().astype(wire_dtype)
    record["soft-labels"] = ArrayRecord({"probs": Array(wire)})

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=f"soft-labels: codec {codec} expects dtype {codec}, got {wire.dtype}"):
        SoftLabelReply.from_record(record, query)


def test_other_public_set_is_a_fingerprint_mismatch() -> None:
    # Prepare
    query = make_query()
    record = make_reply(query, fingerprint=OTHER_FINGERPRINT).to_record()

    # Execute
    with pytest.raises(FingerprintMismatch) as excinfo:
        SoftLabelReply.from_record(record, query)

    # Assert
    assert isinstance(excinfo.value, MessageFormatError)
    assert str(excinfo.value).startswith(
        "public set fingerprint mismatch: server has 3f2a00000000..., the node has 9c1effffffff...;"
    )


def drop(record_key: str, key: str | None = None) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        if key is None:
            del record[record_key]
        else:
            del record[record_key][key]
    return change


def put(record_key: str, key: str, value) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        record[record_key][key] = value
    return change


def replace(record_key: str, value) -> Callable[[RecordDict], None]:
    def change(record: RecordDict) -> None:
        record[record_key] = value
    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(drop("soft-labels"), r"missing record 'soft-labels' \(got \['metrics', 'release'\]\)", id="no-soft-labels"),
        pytest.param(drop("release"), r"missing record 'release' \(got \['metrics', 'soft-labels'\]\)", id="no-release"),
        pytest.param(drop("metrics"), r"missing record 'metrics'", id="no-metrics"),
        pytest.param(drop("release", "fingerprint"), r"release: missing key 'fingerprint'", id="no-fingerprint"),
        pytest.param(drop("release", "round"), r"release: missing key 'round'", id="no-round"),
        pytest.param(drop("release", "codec"), r"release: missing key 'codec'", id="no-codec"),
        pytest.param(drop("metrics", "num-examples"), r"metrics: missing key 'num-examples'", id="no-num-examples"),
        pytest.param(drop("metrics", "train-loss"), r"metrics: missing key 'train-loss'", id="no-train-loss"),
        pytest.param(drop("soft-labels", "probs"), r"record 'soft-labels': missing array 'probs'", id="no-probs"),
        pytest.param(put("release", "round", 2), r"release: expected round 3 codec float16, got round 2 codec float16", id="wrong-round"),
        pytest.param(put("release", "codec", "float32"), r"expected round 3 codec float16, got round 3 codec float32", id="wrong-codec"),
        pytest.param(put("release", "round", "3"), r"release: key 'round' must be int, got str", id="round-str"),
        pytest.param(put("release", "round", True), r"release: key 'round' must be int, got bool", id="round-bool"),
        pytest.param(put("release", "round", [3]), r"release: key 'round' must be int, got list", id="round-list"),
        pytest.param(put("release", "fingerprint", FINGERPRINT.encode()), r"release: key 'fingerprint' must be str, got bytes", id="fingerprint-bytes"),
        pytest.param(put("release", "codec", 16), r"release: key 'codec' must be str, got int", id="codec-int"),
        pytest.param(put("metrics", "num-examples", 1234.0), r"metrics: key 'num-examples' must be int, got float", id="num-examples-float"),
        pytest.param(put("metrics", "teacher-params", 1.5), r"metrics: key 'teacher-params' must be int, got float", id="params-float"),
        pytest.param(put("metrics", "num-examples", 0), r"metrics: num-examples must be >= 1, got 0", id="num-examples-0"),
        pytest.param(replace("release", MetricRecord({"round": 3})), r"record 'release': expected ConfigRecord, got MetricRecord", id="release-kind"),
        pytest.param(replace("soft-labels", ConfigRecord({"probs": 1})), r"record 'soft-labels': expected ArrayRecord, got ConfigRecord", id="soft-labels-kind"),
        pytest.param(
            replace("soft-labels", ArrayRecord({"probs": Array(dtype="float16", shape=(4, 10), stype="numpy.ndarray", data=b"garbage")})),
            r"record 'soft-labels': array 'probs' cannot be decoded", id="undecodable",
        ),
    ],
)
def test_malformed_reply_record_is_rejected(change: Callable[[RecordDict], None], expected: str) -> None:
    # Prepare
    query = make_query()
    record = make_reply(query).to_record()
    change(record)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        SoftLabelReply.from_record(record, query)


def test_metrics_ints_are_accepted_as_floats() -> None:
    # Prepare
    query = make_query()
    record = make_reply(query).to_record()
    record["metrics"]["train-loss"] = 1
    record["metrics"]["teacher-accuracy"] = 0

    # Execute
    parsed = SoftLabelReply.from_record(record, query)

    # Assert
    assert (parsed.train_loss, parsed.teacher_accuracy) == (1.0, 0.0)
    assert isinstance(parsed.train_loss, float)


def test_off_simplex_message_names_the_worst_row() -> None:
    # Prepare: row 1 sums to 2, row 3 to 3 (the worst)
    query = make_query("float32")
    probs = make_probs()
    probs[1] *= 2.0
    probs[3] *= 3.0
    record = make_reply(query, probs=probs).to_record()

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=r"2 rows do not sum to 1 \(worst 3\.0000"):
        SoftLabelReply.from_record(record, query)


@st.composite
def wire_replies(draw) -> tuple[np.ndarray, str]:
    """A codec, and anything a node could put on the wire: right or wrong shape and dtype, simplex rows or junk."""
    codec = draw(st.sampled_from(["float16", "float32"]))
    if draw(st.booleans()):  # shape and dtype the query expects: only the values are in question
        (m, c), dtype = (3, 4), np.dtype(codec)
    else:
        m, c = draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([3, 4, 5]))
        dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    if draw(st.booleans()):
        weights = draw(hnp.arrays(np.float64, (m, c), elements=st.floats(0, 1)))
        weights[weights.sum(axis=1) == 0, 0] = 1.0
        matrix = weights / weights.sum(axis=1, keepdims=True)
    else:
        matrix = draw(hnp.arrays(np.float64, (m, c), elements=st.floats(width=32)))  # NaN, inf, negatives
    with np.errstate(over="ignore"):
        return matrix.astype(dtype), codec


@settings(max_examples=80, deadline=None)
@given(wire_and_codec=wire_replies())
def test_any_reply_is_rows_on_the_simplex_or_a_message_format_error(wire_and_codec: tuple[np.ndarray, str]) -> None:
    # Prepare
    wire, codec = wire_and_codec
    query = make_query(codec, m=3, c=4)
    record = make_reply(query).to_record()
    record["soft-labels"] = ArrayRecord({"probs": Array(wire)})

    # Execute
    try:
        reply = SoftLabelReply.from_record(record, query)
    except MessageFormatError:
        event("rejected")
        return
    event("accepted")

    # Assert
    probs = reply.soft_labels
    assert probs.dtype == np.float32 and probs.shape == (3, 4)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    assert np.abs(probs.sum(axis=1, dtype=np.float64) - 1.0).max() <= simplex_tolerance(codec, 4)


@settings(max_examples=40, deadline=None)
@given(
    matrix=hnp.arrays(np.float32, (3, 4), elements=st.floats(width=32)),
    codec=st.sampled_from(["float16", "float32"]),
)
def test_any_encoded_matrix_is_rows_on_the_simplex_or_a_message_format_error(matrix: np.ndarray, codec: str) -> None:
    # Prepare
    query = make_query(codec, m=3, c=4)
    with np.errstate(over="ignore"):
        record = make_reply(query, probs=matrix).to_record()

    # Execute
    try:
        reply = SoftLabelReply.from_record(record, query)
    except MessageFormatError:
        return

    # Assert
    assert np.isfinite(reply.soft_labels).all() and (reply.soft_labels >= 0).all()
    assert np.abs(reply.soft_labels.sum(axis=1, dtype=np.float64) - 1.0).max() <= simplex_tolerance(codec, 4)


# ---------------------------------------------------------------------------------------------------
# Query rejections
# ---------------------------------------------------------------------------------------------------


def put_ids(ids: np.ndarray) -> Callable[[RecordDict], None]:
    return replace("sample-ids", ArrayRecord({"ids": Array(ids)}))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(drop("query"), r"missing record 'query' \(got \['sample-ids'\]\)", id="no-query"),
        pytest.param(drop("sample-ids"), r"missing record 'sample-ids' \(got \['query'\]\)", id="no-sample-ids"),
        pytest.param(drop("sample-ids", "ids"), r"record 'sample-ids': missing array 'ids'", id="no-ids"),
        pytest.param(put_ids(np.array([1.0, 2.0])), r"sample-ids: expected 1-d int64, got 1-d float64", id="float-ids"),
        pytest.param(put_ids(np.array([1, 2], dtype=np.int32)), r"sample-ids: expected 1-d int64, got 1-d int32", id="int32-ids"),
        pytest.param(put_ids(np.zeros((2, 2), dtype=np.int64)), r"sample-ids: expected 1-d int64, got 2-d int64", id="2d-ids"),
        pytest.param(drop("query", "temperature"), r"query: missing key 'temperature'", id="no-temperature"),
        pytest.param(drop("query", "evaluate-teacher"), r"query: missing key 'evaluate-teacher'", id="no-evaluate"),
        pytest.param(put("query", "round", True), r"query: key 'round' must be int, got bool", id="round-bool"),
        pytest.param(put("query", "temperature", "3.0"), r"query: key 'temperature' must be float, got str", id="temperature-str"),
        pytest.param(put("query", "num-classes", 10.0), r"query: key 'num-classes' must be int, got float", id="classes-float"),
        pytest.param(put("query", "evaluate-teacher", 1), r"query: key 'evaluate-teacher' must be bool, got int", id="evaluate-int"),
        pytest.param(put("query", "temperature", 0.0), r"query: temperature must be > 0.*got 0.0, 'float16', 10", id="temperature-0"),
        pytest.param(put("query", "temperature", -1.0), r"query: temperature must be > 0", id="temperature-negative"),
        pytest.param(put("query", "codec", "int8"), r"codec one of \['float32', 'float16'\].*got 3.0, 'int8', 10", id="codec"),
        pytest.param(put("query", "num-classes", 1), r"num-classes >= 2; got 3.0, 'float16', 1", id="one-class"),
    ],
)
def test_malformed_query_record_is_rejected(change: Callable[[RecordDict], None], expected: str) -> None:
    # Prepare
    record = make_query().to_record()
    change(record)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        SoftLabelQuery.from_record(record)


def test_nan_temperature_is_rejected() -> None:
    # Prepare
    record = make_query().to_record()
    record["query"]["temperature"] = math.nan

    # Execute / Assert
    with pytest.raises(MessageFormatError, match="temperature must be > 0"):
        SoftLabelQuery.from_record(record)


# ---------------------------------------------------------------------------------------------------
# Message size
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["float16", "float32"])
def test_record_size_grows_with_payload(codec: str) -> None:
    # Prepare
    records = [make_reply(make_query(codec, m=m)).to_record() for m in (10, 100, 1000)]

    # Execute
    sizes = [record_nbytes(record) for record in records]

    # Assert
    assert sizes[0] < sizes[1] < sizes[2]
    itemsize = np.dtype(codec).itemsize
    assert sizes[2] - sizes[1] >= 900 * C * itemsize


def test_float16_payload_is_about_half_the_float32_one() -> None:
    # Prepare
    half, full = (make_reply(make_query(codec, m=2000)).to_record() for codec in ("float16", "float32"))

    # Execute
    ratio = record_nbytes(half) / record_nbytes(full)

    # Assert
    assert 0.45 <= ratio <= 0.55


# ---------------------------------------------------------------------------------------------------
# The ClientApp's check of a query against what the node holds
# ---------------------------------------------------------------------------------------------------


def test_check_query_accepts_a_matching_query() -> None:
    # Prepare
    query = make_query(sample_ids=np.array([0, 5, 99], dtype=np.int64))

    # Execute / Assert: no exception
    assert check_query(query, FINGERPRINT, num_classes=10, public_size=100) is None


def test_check_query_accepts_no_sample_ids() -> None:
    # Prepare
    query = make_query(m=0)

    # Execute / Assert
    assert check_query(query, FINGERPRINT, num_classes=10, public_size=100) is None


def test_check_query_refuses_another_public_set() -> None:
    # Prepare
    query = make_query()

    # Execute / Assert
    with pytest.raises(
        FingerprintMismatch,
        match=r"public set fingerprint mismatch: server has 3f2a00000000\.\.\., this node has 9c1effffffff\.\.\.; "
        r"check this node's data-dir, public-size and seed",
    ):
        check_query(query, OTHER_FINGERPRINT, num_classes=10, public_size=100)


def test_check_query_refuses_another_label_space() -> None:
    # Prepare
    query = make_query()

    # Execute / Assert
    with pytest.raises(MessageFormatError, match="label space mismatch: server expects 10 classes, this node has 8"):
        check_query(query, FINGERPRINT, num_classes=8, public_size=100)


@pytest.mark.parametrize("bad_id", [-1, 100, 10**9])
def test_check_query_refuses_sample_ids_outside_the_public_set(bad_id: int) -> None:
    # Prepare
    query = make_query(sample_ids=np.array([0, bad_id, 5], dtype=np.int64))

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=r"sample-ids: indices must lie in \[0, 100\) of the public set"):
        check_query(query, FINGERPRINT, num_classes=10, public_size=100)
