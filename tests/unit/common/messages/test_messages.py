"""Unit tests of common/messages/ (and the ClientApp's `check_query`); the codecs alone are in test_codecs.py.

Round-trips through Flower records for every codec, and every way a query or reply can be malformed:
each rejection is a `MessageFormatError` whose message names the problem.
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
from common.codecs import CODECS, encode, max_abs_error, simplex_tolerance, wire_schema
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
        top_k=query.top_k,
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


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_query_top_k_round_trips(top_k: int) -> None:
    # Execute
    parsed = SoftLabelQuery.from_record(make_query("topk", top_k=top_k).to_record())

    # Assert
    assert (parsed.codec, parsed.top_k) == ("topk", top_k)


@pytest.mark.parametrize(("codec", "top_k"), [("float32", 1), ("float16", 1), ("uint8", 1), ("topk", 1), ("topk", 3), ("topk", C)])
def test_reply_round_trips_for_every_codec(codec: str, top_k: int) -> None:
    # Prepare
    query = make_query(codec, top_k=top_k)
    reply = make_reply(query)

    # Execute
    record = reply.to_record()
    parsed = SoftLabelReply.from_record(record, query)

    # Assert: the codec's arrays travel, and come back as float32 rows on the simplex
    probs = parsed.soft_labels
    assert set(record["soft-labels"].keys()) == set(encode(reply.soft_labels, codec, top_k))
    assert probs.dtype == np.float32 and probs.shape == (M, C) and parsed.top_k == top_k
    assert np.abs(probs.sum(axis=1, dtype=np.float64) - 1.0).max() <= simplex_tolerance(codec, C, top_k)
    bound = max_abs_error(codec, C, top_k)
    if bound is not None:
        assert np.abs(probs - reply.soft_labels).max() <= bound
    else:  # topk: each row's k largest within float16 rounding, the other entries all equal
        kept = np.argsort(-reply.soft_labels, axis=1, kind="stable")[:, :top_k]
        kept_error = np.take_along_axis(probs - reply.soft_labels, kept, axis=1)
        assert np.abs(kept_error).max() <= max_abs_error("float16", C)
        others = np.ones_like(probs, dtype=bool)
        np.put_along_axis(others, kept, False, axis=1)
        rest = probs[others].reshape(M, C - top_k)
        assert (rest == rest[:, :1]).all()


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
        pytest.param(put("release", "fingerprint", FINGERPRINT.encode()),
                     r"release: key 'fingerprint' must be str, got bytes", id="fingerprint-bytes"),
        pytest.param(put("release", "codec", 16), r"release: key 'codec' must be str, got int", id="codec-int"),
        pytest.param(put("metrics", "num-examples", 1234.0),
                     r"metrics: key 'num-examples' must be int, got float", id="num-examples-float"),
        pytest.param(put("metrics", "teacher-params", 1.5), r"metrics: key 'teacher-params' must be int, got float", id="params-float"),
        pytest.param(put("metrics", "num-examples", 0), r"metrics: num-examples must be >= 1, got 0", id="num-examples-0"),
        pytest.param(replace("release", MetricRecord({"round": 3})),
                     r"record 'release': expected ConfigRecord, got MetricRecord", id="release-kind"),
        pytest.param(replace("soft-labels", ConfigRecord({"probs": 1})),
                     r"record 'soft-labels': expected ArrayRecord, got ConfigRecord", id="soft-labels-kind"),
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
def wire_replies(draw) -> tuple[dict[str, np.ndarray], str, int]:
    """A codec and top-k, and anything a node could put on the wire: a valid encoding, one with an entry
    changed, the codec's arrays holding junk, or arrays of any name, dtype and shape."""
    codec, top_k = draw(st.sampled_from(CODECS)), draw(st.integers(1, 4))
    schema = wire_schema(codec, 4, top_k)
    kind = draw(st.sampled_from(["valid", "altered", "junk", "anything"]))
    if kind in ("valid", "altered"):
        weights = draw(hnp.arrays(np.float64, (3, 4), elements=st.floats(0, 1)))
        weights[weights.sum(axis=1) == 0, 0] = 1.0
        arrays = encode((weights / weights.sum(axis=1, keepdims=True)).astype(np.float32), codec, top_k)
        if kind == "altered":
            name = draw(st.sampled_from(sorted(arrays)))
            array = arrays[name]
            where = (draw(st.integers(0, array.size - 1)) if array.ndim == 1  # vote's byte stream
                     else draw(st.tuples(st.integers(0, 2), st.integers(0, array.shape[1] - 1))))
            values = st.integers(0, 255) if name in ("quanta", "indices", "votes") else st.floats(width=16)
            array[where] = draw(values)
        return arrays, codec, top_k
    if kind == "junk":
        return {name: draw(hnp.arrays(dtype, (3, width) if width else (draw(st.integers(0, 16)),)))
                for name, (dtype, width) in schema.items()}, codec, top_k
    names = draw(st.lists(st.sampled_from(["probs", "quanta", "values", "indices", "votes"]), max_size=3, unique=True))
    dtypes = st.sampled_from([np.float16, np.float32, np.float64, np.uint8, np.uint16, np.int64])
    shapes = st.sampled_from([(3, 4), (3, top_k), (2, 4), (3, 5), (12,), ()])
    return {name: draw(hnp.arrays(draw(dtypes), draw(shapes))) for name in names}, codec, top_k


@settings(max_examples=150, deadline=None)
@given(wire=wire_replies())
def test_any_reply_is_rows_on_the_simplex_or_a_message_format_error(wire: tuple[dict[str, np.ndarray], str, int]) -> None:
    # Prepare
    arrays, codec, top_k = wire
    query = make_query(codec, m=3, c=4, top_k=top_k)
    record = make_reply(query).to_record()
    record["soft-labels"] = ArrayRecord({name: Array(array) for name, array in arrays.items()})

    # Execute
    try:
        reply = SoftLabelReply.from_record(record, query)
    except MessageFormatError:
        event("rejected")
        return
    event(f"accepted {codec}")

    # Assert
    probs = reply.soft_labels
    assert probs.dtype == np.float32 and probs.shape == (3, 4)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    assert np.abs(probs.sum(axis=1, dtype=np.float64) - 1.0).max() <= simplex_tolerance(codec, 4, top_k)


@settings(max_examples=80, deadline=None)
@given(
    matrix=hnp.arrays(np.float32, (3, 4), elements=st.floats(width=32)),
    codec=st.sampled_from(CODECS),
    top_k=st.integers(1, 4),
)
def test_any_encoded_matrix_is_rows_on_the_simplex_or_a_message_format_error(
    matrix: np.ndarray, codec: str, top_k: int,
) -> None:
    # Prepare
    query = make_query(codec, m=3, c=4, top_k=top_k)

    # Execute: uint8 and topk refuse to encode junk, the float codecs leave it to the receiver
    try:
        with np.errstate(over="ignore"):
            record = make_reply(query, probs=matrix).to_record()
        reply = SoftLabelReply.from_record(record, query)
    except MessageFormatError:
        return

    # Assert
    assert np.isfinite(reply.soft_labels).all() and (reply.soft_labels >= 0).all()
    sums = reply.soft_labels.sum(axis=1, dtype=np.float64)
    assert np.abs(sums - 1.0).max() <= simplex_tolerance(codec, 4, top_k)


# ---------------------------------------------------------------------------------------------------
# Malformed uint8 and topk payloads
# ---------------------------------------------------------------------------------------------------


def with_arrays(**arrays: np.ndarray) -> Callable[[RecordDict], None]:
    """Replace (or, with None, drop) named arrays of the reply's soft-labels record."""
    def change(record: RecordDict) -> None:
        wire = {name: record["soft-labels"][name].numpy() for name in record["soft-labels"].keys()}
        wire.update(arrays)
        record["soft-labels"] = ArrayRecord({n: Array(a) for n, a in wire.items() if a is not None})
    return change


TOP2 = dict(values=np.array([[0.5, 0.25]] * M, dtype=np.float16), indices=np.array([[0, 1]] * M, dtype=np.uint8))


def top2(values: list[float] | None = None, indices: list[int] | None = None, value_dtype=np.float16,
         index_dtype=np.uint8) -> dict[str, np.ndarray]:
    """The valid top-2 payload TOP2 with row 1 changed, or its arrays cast to other dtypes."""
    arrays = {name: array.copy() for name, array in TOP2.items()}
    if values is not None:
        arrays["values"][1] = values
    if indices is not None:
        arrays["indices"][1] = indices
    return {"values": arrays["values"].astype(value_dtype), "indices": arrays["indices"].astype(index_dtype)}


def off_by_one_quanta(record: RecordDict) -> None:
    """Move a quantum out of row 0 and add one to row 2: both rows then miss 255."""
    quanta = record["soft-labels"]["quanta"].numpy().astype(np.int64)
    quanta[0, np.argmax(quanta[0])] -= 1
    quanta[2, np.argmax(quanta[2])] += 1
    with_arrays(quanta=quanta.astype(np.uint8))(record)


@pytest.mark.parametrize(
    ("codec", "change", "expected"),
    [
        pytest.param("uint8", off_by_one_quanta, r"soft-labels: 2 rows of uint8 quanta do not sum to 255", id="uint8-sum"),
        pytest.param("uint8", with_arrays(quanta=np.full((M, C), 25, dtype=np.int16)),
                     r"soft-labels: codec uint8 expects dtype uint8, got int16", id="uint8-dtype"),
        pytest.param("uint8", with_arrays(quanta=np.zeros((M, C + 1), dtype=np.uint8)),
                     r"soft-labels: expected shape \(4, 10\), got \(4, 11\)", id="uint8-shape"),
        pytest.param("uint8", with_arrays(quanta=None, probs=make_probs()), r"unexpected arrays \['probs'\]", id="uint8-as-float"),
        pytest.param("uint8", with_arrays(quanta=None), r"record 'soft-labels': missing array 'quanta'", id="uint8-none"),
        pytest.param("topk", with_arrays(**top2(indices=[0, 10])), r"1 rows hold class indices >= num-classes 10", id="index-10"),
        pytest.param("topk", with_arrays(**top2(indices=[3, 3])), r"1 rows repeat a class index", id="duplicate-index"),
        pytest.param("topk", with_arrays(**top2(values=[0.5, -0.125])), r"negative values \(min -0.125\)", id="negative"),
        pytest.param("topk", with_arrays(**top2(values=[math.nan, 0.25])), r"1 rows hold NaN or inf", id="nan"),
        pytest.param("topk", with_arrays(**top2(values=[0.75, 0.5])), r"1 rows have top-2 values summing to more than 1",
                     id="mass-over-1"),
        pytest.param("topk", with_arrays(**top2(index_dtype=np.int64)), r"codec topk expects dtype uint8 for 'indices', got int64",
                     id="index-dtype"),
        pytest.param("topk", with_arrays(**top2(value_dtype=np.float32)),
                     r"codec topk expects dtype float16 for 'values', got float32", id="value-dtype"),
        pytest.param("topk", with_arrays(values=TOP2["values"][:, :1]),
                     r"soft-labels 'values': expected shape \(4, 2\), got \(4, 1\)", id="k-mismatch"),
        pytest.param("topk", with_arrays(indices=TOP2["indices"][:3]),
                     r"soft-labels 'indices': expected shape \(4, 2\), got \(3, 2\)", id="rows-mismatch"),
        pytest.param("topk", with_arrays(indices=None), r"record 'soft-labels': missing array 'indices'", id="no-indices"),
        pytest.param("topk", with_arrays(probs=make_probs()), r"unexpected arrays \['probs'\]", id="extra-probs"),
    ],
)
def test_malformed_uint8_and_topk_payloads_are_rejected(codec: str, change: Callable[[RecordDict], None], expected: str) -> None:
    # Prepare
    query = make_query(codec, top_k=2)
    record = make_reply(query).to_record()
    change(record)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        SoftLabelReply.from_record(record, query)


def test_a_reply_encoded_with_another_k_is_rejected() -> None:
    # Prepare
    query = make_query("topk", top_k=3)
    record = make_reply(query, top_k=1).to_record()

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=r"soft-labels 'values': expected shape \(4, 3\), got \(4, 1\)"):
        SoftLabelReply.from_record(record, query)


@pytest.mark.parametrize("codec", ["uint8", "topk"])
def test_lossy_codecs_refuse_to_encode_logits(codec: str) -> None:
    # Prepare
    reply = make_reply(make_query(codec), probs=make_probs() * 3.0)

    # Execute / Assert: the node's own encoder refuses, with the validator's words
    with pytest.raises(MessageFormatError, match=r"4 rows do not sum to 1 .*send softmax probabilities, not logits"):
        reply.to_record()


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
        pytest.param(
            put("query", "codec", "int8"), r"codec one of \['float32', 'float16', 'uint8', 'topk', 'vote'\].*got 3.0, 'int8', 10",
            id="codec",
        ),
        pytest.param(drop("query", "top-k"), r"query: missing key 'top-k'", id="no-top-k"),
        pytest.param(put("query", "top-k", True), r"query: key 'top-k' must be int, got bool", id="top-k-bool"),
        pytest.param(put("query", "top-k", 0), r"query: top-k must be in \[1, num-classes = 10\], got 0", id="top-k-0"),
        pytest.param(put("query", "top-k", 11), r"query: top-k must be in \[1, num-classes = 10\], got 11", id="top-k-over-c"),
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


# the codecs module's table, k = 1; vote: zlib-compressed votes, uniform over C classes here (log2 C bits a row)
BYTES_PER_ROW = {"float32": 4 * C, "float16": 2 * C, "uint8": C, "topk": 3, "vote": 0.4}


@pytest.mark.parametrize("codec", CODECS)
def test_record_size_grows_with_payload(codec: str) -> None:
    # Prepare
    records = [make_reply(make_query(codec, m=m)).to_record() for m in (10, 100, 1000)]

    # Execute
    sizes = [record_nbytes(record) for record in records]

    # Assert
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] - sizes[1] >= 900 * BYTES_PER_ROW[codec]


@pytest.mark.parametrize(("codec", "kilobytes"), [("float32", 400), ("float16", 200), ("uint8", 100), ("topk", 30)])
def test_a_10000_by_10_reply_has_the_documented_size(codec: str, kilobytes: int) -> None:
    # Prepare
    reply = make_reply(make_query(codec, m=10_000, top_k=1))

    # Execute
    size = record_nbytes(reply.to_record())

    # Assert: the payload, plus under 2 kB of headers and metrics
    assert kilobytes * 1000 <= size <= kilobytes * 1000 + 2000


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
