"""Unit tests of common/codecs.py: round-trips within the documented bounds, golden encodings,
bytes per row, and every way a wire payload can be malformed (each a `MessageFormatError`)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.codecs import CODECS, decode, encode, max_abs_error, simplex_tolerance, wire_schema
from common.errors import MessageFormatError

F16_ERROR = 2**-11  # float16 rounding of a value in [0, 1]: at most half the spacing at 1


def make_probs(m: int = 4, c: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(c), size=m).astype(np.float32)  # (m, c) rows sum to 1


@st.composite
def simplex_matrices(draw, max_classes: int = 24) -> np.ndarray:
    """float32 `(m, C)` rows on the simplex: dense, sparse (exact zeros) or one-hot, with ties."""
    m, c = draw(st.integers(0, 12)), draw(st.integers(2, max_classes))
    values = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    weights = draw(hnp.arrays(np.float64, (m, c), elements=values))
    weights[weights.sum(axis=1) == 0, 0] = 1.0
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Round-trips within the stated bounds
# ---------------------------------------------------------------------------------------------------


def test_codec_names() -> None:
    # Execute / Assert: common/config.py checks the run config's codec against this tuple
    assert CODECS == ("float32", "float16", "uint8", "topk", "vote")


@settings(max_examples=120, deadline=None)
@given(probs=simplex_matrices(), codec=st.sampled_from(["float32", "float16", "uint8"]))
def test_rounding_codecs_round_trip_within_max_abs_error(probs: np.ndarray, codec: str) -> None:
    # Prepare
    m, c = probs.shape

    # Execute
    wire = encode(probs, codec)
    back = decode(wire, codec, c)

    # Assert
    assert back.dtype == np.float32 and back.shape == (m, c)
    assert np.abs(back - probs).max(initial=0.0) <= max_abs_error(codec, c)
    assert np.abs(back.sum(axis=1, dtype=np.float64) - 1.0).max(initial=0.0) <= simplex_tolerance(codec, c)
    if codec == "uint8":
        assert (wire["quanta"].sum(axis=1, dtype=np.int64) == 255).all()


@settings(max_examples=120, deadline=None)
@given(probs=simplex_matrices(), data=st.data())
def test_topk_keeps_the_largest_entries_and_spreads_the_rest_evenly(probs: np.ndarray, data: st.DataObject) -> None:
    # Prepare
    m, c = probs.shape
    k = data.draw(st.integers(1, c), label="k")

    # Execute
    wire = encode(probs, "topk", top_k=k)
    back = decode(wire, "topk", c, top_k=k)

    # Assert: the kept entries are the k largest, exact up to float16 rounding
    kept = wire["indices"].astype(np.int64)  # (m, k)
    others = np.ones((m, c), dtype=bool)
    np.put_along_axis(others, kept, False, axis=1)
    p = probs.astype(np.float64)
    assert np.abs(np.take_along_axis(back, kept, axis=1) - np.take_along_axis(p, kept, axis=1)).max(initial=0) <= F16_ERROR
    kept_min = np.take_along_axis(p, kept, axis=1).min(axis=1, initial=1.0)
    assert (np.where(others, p, 0.0).max(axis=1, initial=0.0) <= kept_min).all()
    # ... the others all equal the mean of what they replace (up to the kept entries' rounding)
    if k < c:
        rest = back[others].reshape(m, c - k)
        assert (rest == rest[:, :1]).all()
        true_mean = np.where(others, p, 0.0).sum(axis=1) / (c - k)
        np.testing.assert_allclose(rest[:, 0], true_mean, rtol=0, atol=k * F16_ERROR / (c - k) + 1e-6)
    # ... and rows stay on the simplex
    assert (back >= 0).all()
    assert np.abs(back.sum(axis=1, dtype=np.float64) - 1.0).max(initial=0.0) <= simplex_tolerance("topk", c, k)


@pytest.mark.parametrize("codec", CODECS)
def test_no_rows_round_trip(codec: str) -> None:
    # Execute
    back = decode(encode(np.zeros((0, 5), dtype=np.float32), codec, top_k=2), codec, 5, top_k=2, num_rows=0)

    # Assert
    assert back.shape == (0, 5) and back.dtype == np.float32


@pytest.mark.parametrize("codec", ["float16", "float32"])
def test_float_codecs_cast_and_keep_the_values(codec: str) -> None:
    # Prepare
    probs = make_probs()

    # Execute
    wire = encode(probs, codec)
    back = decode(wire, codec, 10)

    # Assert
    assert list(wire) == ["probs"]
    assert wire["probs"].dtype == np.dtype(codec) and wire["probs"].flags.c_contiguous
    np.testing.assert_array_equal(back, probs.astype(codec).astype(np.float32))


def test_float_codecs_pass_junk_on_for_the_receiver_to_reject() -> None:
    # Execute: a float codec is a cast; validation is the receiver's job
    wire = encode(np.array([[math.nan, 2.0]], dtype=np.float32), "float16")

    # Assert
    assert np.isnan(decode(wire, "float16", 2)[0, 0])


# ---------------------------------------------------------------------------------------------------
# Golden values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "quanta"),
    [
        pytest.param([0.5, 0.25, 0.25], [127, 64, 64], id="remainders-0.5-0.75-0.75"),
        pytest.param([0.5, 0.5], [128, 127], id="tie-goes-to-lower-class"),
        pytest.param([0.25] * 4, [64, 64, 64, 63], id="three-of-four-ties"),
        pytest.param([0.1] * 10, [26] * 5 + [25] * 5, id="five-of-ten-ties"),
        pytest.param([1.0, 0.0, 0.0], [255, 0, 0], id="one-hot"),
        pytest.param([1 / 3] * 3, [85, 85, 85], id="exact-thirds"),
    ],
)
def test_uint8_golden_largest_remainder(probs: list[float], quanta: list[int]) -> None:
    # Prepare: 255 p floored; the leftover quanta go to the largest remainders, ties to the lower class
    row = np.array([probs], dtype=np.float32)

    # Execute
    wire = encode(row, "uint8")

    # Assert
    assert list(wire) == ["quanta"] and wire["quanta"].dtype == np.uint8
    np.testing.assert_array_equal(wire["quanta"], [quanta])
    np.testing.assert_allclose(decode(wire, "uint8", len(probs)), [np.array(quanta) / 255], rtol=1e-7)


def test_topk_golden_k1_spreads_the_rest() -> None:
    # Execute
    wire = encode(np.array([[0.3, 0.6, 0.1]], dtype=np.float32), "topk", top_k=1)
    back = decode(wire, "topk", 3, top_k=1)

    # Assert
    top = float(np.float16(0.6))  # 0.60009765625
    np.testing.assert_array_equal(wire["indices"], [[1]])
    np.testing.assert_array_equal(wire["values"], np.array([[top]], dtype=np.float16))
    np.testing.assert_allclose(back, [[(1 - top) / 2, top, (1 - top) / 2]], rtol=1e-7)


def test_topk_golden_k2_largest_first_ties_to_lower_class() -> None:
    # Execute
    wire = encode(np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32), "topk", top_k=2)

    # Assert
    assert wire["indices"].dtype == np.uint8 and wire["values"].dtype == np.float16
    np.testing.assert_array_equal(wire["indices"], [[0, 1], [3, 2]])
    np.testing.assert_array_equal(wire["values"], np.array([[0.25, 0.25], [0.4, 0.3]], dtype=np.float16))


def test_topk_with_k_equal_to_c_spreads_nothing() -> None:
    # Execute
    back = decode(encode(np.array([[0.5, 0.25, 0.25]]), "topk", top_k=3), "topk", 3, top_k=3)

    # Assert
    np.testing.assert_array_equal(back, [[0.5, 0.25, 0.25]])


def test_topk_indices_widen_to_uint16_beyond_256_classes() -> None:
    # Prepare
    probs = np.zeros((2, 300), dtype=np.float32)
    probs[0, 299], probs[0, 0], probs[1, 257] = 0.75, 0.25, 1.0

    # Execute
    wire = encode(probs, "topk", top_k=2)
    back = decode(wire, "topk", 300, top_k=2)

    # Assert
    assert wire["indices"].dtype == np.uint16 and wire_schema("topk", 256)["indices"][0] == np.uint8
    np.testing.assert_array_equal(wire["indices"], [[299, 0], [257, 0]])
    np.testing.assert_array_equal(back[0, [299, 0]], [0.75, 0.25])
    assert back[1, 257] == 1.0 and back[1].sum() == 1.0


@pytest.mark.parametrize(
    ("codec", "num_classes", "top_k", "bytes_per_row"),
    [
        ("float32", 10, 1, 40), ("float16", 10, 1, 20), ("uint8", 10, 1, 10),
        ("topk", 10, 1, 3), ("topk", 10, 3, 9), ("topk", 256, 2, 6), ("topk", 300, 2, 8), ("uint8", 300, 1, 300),
    ],
)
def test_bytes_per_row_match_the_module_table(codec: str, num_classes: int, top_k: int, bytes_per_row: int) -> None:
    # Prepare
    probs = make_probs(m=50, c=num_classes)

    # Execute
    arrays = encode(probs, codec, top_k=top_k)

    # Assert
    assert sum(a.nbytes for a in arrays.values()) == 50 * bytes_per_row


def test_max_abs_error_golden_values() -> None:
    # Execute / Assert
    assert max_abs_error("float32", 10) == 2**-24
    assert max_abs_error("float16", 10) == 2**-11
    assert max_abs_error("uint8", 10) == 1 / 255
    assert max_abs_error("topk", 10, top_k=3) is None


def test_simplex_tolerance_golden_values() -> None:
    # Execute / Assert: C ulps at 1 (k for topk's float16 values), at least 1e-4
    assert simplex_tolerance("float16", 10) == pytest.approx(10 * 2**-10)
    assert simplex_tolerance("float32", 10) == 1e-4
    assert simplex_tolerance("uint8", 10) == 1e-4
    assert simplex_tolerance("topk", 10, top_k=3) == pytest.approx(3 * 2**-10)


# ---------------------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [lambda: encode(make_probs(), "int8"), lambda: decode({"probs": make_probs()}, "int8", 10),
     lambda: max_abs_error("int8", 10), lambda: simplex_tolerance("int8", 10)],
)
def test_unknown_codec_is_refused(call: Callable[[], object]) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match="unknown codec 'int8'; known codecs: float32, float16, uint8, topk"):
        call()


def quanta(*rows: list[int]) -> dict[str, np.ndarray]:
    return {"quanta": np.array(rows, dtype=np.uint8)}


def topk(values: list[list[float]], indices: list[list[int]], dtype=np.uint8, value_dtype=np.float16) -> dict[str, np.ndarray]:
    return {"values": np.array(values, dtype=value_dtype), "indices": np.array(indices, dtype=dtype)}


@pytest.mark.parametrize(
    ("codec", "arrays", "top_k", "expected"),
    [
        pytest.param("uint8", quanta([128, 64, 64], [127, 64, 64], [200, 54, 0]), 1,
                     r"soft-labels: 2 rows of uint8 quanta do not sum to 255; encode with largest-remainder", id="uint8-sums"),
        pytest.param("uint8", {"quanta": np.array([[127, 64, 64]], dtype=np.int64)}, 1,
                     r"soft-labels: codec uint8 expects dtype uint8, got int64", id="uint8-dtype"),
        pytest.param("uint8", quanta([255, 0]), 1, r"soft-labels: expected shape \(1, 3\), got \(1, 2\)", id="uint8-shape"),
        pytest.param("uint8", {"probs": np.zeros((1, 3), np.uint8)}, 1,
                     r"codec uint8 sends arrays \['quanta'\], got \['probs'\]", id="uint8-names"),
        pytest.param("topk", topk([[0.5]], [[3]]), 1, r"1 rows hold class indices >= num-classes 3", id="index-out-of-range"),
        pytest.param("topk", topk([[0.5, 0.25]], [[1, 1]]), 2, r"1 rows repeat a class index", id="duplicate-index"),
        pytest.param("topk", topk([[-0.25, 0.5]], [[0, 1]]), 2, r"negative values \(min -0.25\)", id="negative"),
        pytest.param("topk", topk([[math.nan]], [[0]]), 1, r"1 rows hold NaN or inf", id="nan"),
        pytest.param("topk", topk([[math.inf]], [[0]]), 1, r"1 rows hold NaN or inf", id="inf"),
        pytest.param("topk", topk([[0.75, 0.5]], [[0, 1]]), 2,
                     r"1 rows have top-2 values summing to more than 1 \(worst 1.250000", id="mass-over-1"),
        pytest.param("topk", topk([[0.5]], [[0]], dtype=np.int64), 1,
                     r"codec topk expects dtype uint8 for 'indices', got int64", id="index-dtype"),
        pytest.param("topk", topk([[0.5]], [[0]], dtype=np.uint16), 1,
                     r"codec topk expects dtype uint8 for 'indices', got uint16", id="index-too-wide"),
        pytest.param("topk", topk([[0.5]], [[0]], value_dtype=np.float32), 1,
                     r"codec topk expects dtype float16 for 'values', got float32", id="value-dtype"),
        pytest.param("topk", topk([[0.5, 0.25]], [[0, 1]]), 1,
                     r"soft-labels 'values': expected shape \(1, 1\), got \(1, 2\)", id="k-mismatch"),
        pytest.param("topk", topk([[0.5], [0.5]], [[0]]), 1,
                     r"soft-labels 'indices': expected shape \(2, 1\), got \(1, 1\)", id="row-mismatch"),
        pytest.param("topk", {"values": np.zeros((1, 1), np.float16)}, 1,
                     r"codec topk sends arrays \['indices', 'values'\], got \['values'\]", id="no-indices"),
        pytest.param("topk", {**topk([[0.5]], [[0]]), "probs": np.zeros((1, 3), np.float16)}, 1,
                     r"got \['indices', 'probs', 'values'\]", id="extra-array"),
        pytest.param("topk", topk([[0.5]], [[0]]), 0, r"top-k must be an integer in \[1, num-classes = 3\], got 0", id="k-0"),
        pytest.param("topk", topk([[0.5] * 4], [[0, 1, 2, 3]]), 4, r"top-k must be .* got 4", id="k-over-c"),
        pytest.param("float16", {"probs": np.zeros((1, 3), np.float32)}, 1,
                     r"soft-labels: codec float16 expects dtype float16, got float32", id="float16-dtype"),
    ],
)
def test_malformed_wire_arrays_are_rejected(codec: str, arrays: dict[str, np.ndarray], top_k: int, expected: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        decode(arrays, codec, 3, top_k=top_k)


def test_topk_rows_summing_just_over_1_within_tolerance_are_accepted() -> None:
    # Prepare: float16 rounding of k = C values may add up to a little over 1
    arrays = topk([[0.5, 0.2502, 0.2502]], [[0, 1, 2]])

    # Execute
    back = decode(arrays, "topk", 3, top_k=3)

    # Assert
    assert back.sum() == pytest.approx(1.0, abs=simplex_tolerance("topk", 3, 3))


@pytest.mark.parametrize("codec", ["uint8", "topk"])
@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        pytest.param([[math.nan, 0.5, 0.5]], r"soft-labels: 1 rows hold NaN or inf; send finite", id="nan"),
        pytest.param([[1.25, -0.25, 0.0]], r"soft-labels: negative values \(min -0.25\)", id="negative"),
        pytest.param([[2.0, 1.0, 0.5]], r"1 rows do not sum to 1 \(worst 3.500000.*not logits", id="logits"),
        pytest.param([0.5, 0.25, 0.25], r"codec \w+ encodes an \(m, C\) matrix, got shape \(3,\)", id="1-d"),
    ],
)
def test_lossy_encoders_refuse_what_they_cannot_represent(codec: str, probs: list, expected: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=expected):
        encode(np.array(probs, dtype=np.float32), codec)


@pytest.mark.parametrize("top_k", [0, 4, True, 1.5])
def test_topk_encoder_refuses_a_bad_k(top_k) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=r"top-k must be an integer in \[1, num-classes = 3\]"):
        encode(np.array([[0.5, 0.25, 0.25]]), "topk", top_k=top_k)


# ---------------------------------------------------------------------------------------------------
# vote: each row's top class, packed and zlib-compressed
# ---------------------------------------------------------------------------------------------------


def vote_stream(raw: bytes) -> dict[str, np.ndarray]:
    return {"votes": np.frombuffer(zlib.compress(raw, 9), dtype=np.uint8).copy()}


@pytest.mark.parametrize(("rows", "classes"), [(7, 2), (8, 10), (9, 16), (5, 17), (6, 300)])
def test_votes_decode_to_one_hot_rows_on_each_rows_top_class(rows: int, classes: int) -> None:
    # Prepare: a tie in row 0 goes to the lower class
    probs = make_probs(rows, classes)
    probs[0] = 0.0
    probs[0, [classes - 1, 0]] = 0.5

    # Execute
    back = decode(encode(probs, "vote"), "vote", classes, num_rows=rows)

    # Assert
    assert back.dtype == np.float32 and back.shape == (rows, classes)
    np.testing.assert_array_equal(back.argmax(axis=1), probs.argmax(axis=1))
    assert back[0, 0] == 1.0 and (back.sum(axis=1) == 1.0).all() and set(np.unique(back)) <= {0.0, 1.0}


@given(probs=simplex_matrices())
@settings(max_examples=80, deadline=None)
def test_any_rows_vote_for_their_largest_entry(probs: np.ndarray) -> None:
    # Execute
    back = decode(encode(probs, "vote"), "vote", probs.shape[1], num_rows=len(probs))

    # Assert
    np.testing.assert_array_equal(back.argmax(axis=1), probs.astype(np.float64).argmax(axis=1))


def test_ten_thousand_votes_cost_at_most_half_a_byte_each_and_less_when_skewed() -> None:
    # Prepare: votes spread over 10 classes, and a teacher that has seen two
    rng = np.random.default_rng(0)
    spread = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 10_000)]
    skewed = np.eye(10, dtype=np.float32)[rng.choice([3, 7], 10_000, p=[0.9, 0.1])]

    # Execute
    sizes = [encode(probs, "vote")["votes"].nbytes for probs in (spread, skewed)]

    # Assert: about the votes' entropy (log2 10 = 3.3 bits; 0.47 bits for the skewed teacher)
    assert sizes[0] <= 5_000 and sizes[1] <= 1_000


@pytest.mark.parametrize(("arrays", "rows", "match"), [
    (vote_stream(bytes([0x12, 0x30])), 6, "expected exactly 3"),  # 2 bytes hold 4 votes, not 6
    (vote_stream(bytes([0x12])), 4, "holds 1 bytes"),
    (vote_stream(bytes([0x12, 0x34, 0x56])), 4, r"holds 3\+ bytes"),
    (vote_stream(bytes([0x12, 0x31])), 3, "padding nibble"),
    (vote_stream(bytes([0x1C, 0x00])), 4, "1 votes name a class >= num-classes 10"),
    ({"votes": np.frombuffer(b"not zlib at all", dtype=np.uint8).copy()}, 4, "does not inflate"),
    ({"votes": np.frombuffer(zlib.compress(bytes([0x12, 0x30]))[:-3], dtype=np.uint8).copy()}, 4, "does not end"),
    ({"votes": np.frombuffer(zlib.compress(bytes([0x12, 0x30])) + b"x", dtype=np.uint8).copy()}, 4, "expected exactly"),
    ({"votes": np.zeros((2, 2), dtype=np.uint8)}, 4, "one uint8 byte stream"),
    ({"votes": np.zeros(4, dtype=np.float32)}, 4, "one uint8 byte stream"),
    ({"quanta": np.zeros((4, 10), dtype=np.uint8)}, 4, r"sends arrays \['votes'\]"),
])
def test_a_bad_vote_stream_is_a_message_format_error(arrays: dict[str, np.ndarray], rows: int, match: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=match):
        decode(arrays, "vote", 10, num_rows=rows)


def test_a_stream_that_inflates_far_beyond_its_rows_stops_at_them() -> None:
    # Prepare: 64 MB of zeros, compressed to about 64 kB, sent for 10 rows
    bomb = {"votes": np.frombuffer(zlib.compress(bytes(64 << 20), 9), dtype=np.uint8).copy()}

    # Execute / Assert: refused without inflating the rest
    with pytest.raises(MessageFormatError, match=r"holds 6\+ bytes"):
        decode(bomb, "vote", 10, num_rows=10)


def test_votes_need_the_queried_row_count_and_carry_at_most_65536_classes() -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match="needs the number of rows"):
        decode(encode(make_probs(4, 10), "vote"), "vote", 10)
    with pytest.raises(MessageFormatError, match="at most 65536 classes, got 70000; use topk"):
        encode(np.full((1, 70_000), 1 / 70_000, dtype=np.float32), "vote")
