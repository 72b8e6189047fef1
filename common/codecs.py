"""Soft-label codecs: how an `(m, C)` probability matrix is put on the wire and read back.

A codec turns the matrix into a few named arrays (the reply's "soft-labels" ArrayRecord) and back:

    codec     wire arrays                                bytes per row          lossy?
    -------   -----------------------------------------  ---------------------  -------------------------
    float32   probs   (m, C) float32                      4 C                    no (input is float32)
    float16   probs   (m, C) float16                      2 C                    rounding, <= 2^-11
    uint8     quanta  (m, C) uint8, rows sum to 255       C                      rounding, <= 1/255
    topk      values  (m, k) float16, k largest per row   k (2 + 1), C <= 256    by design: the C - k
              indices (m, k) uint8 class ids              k (2 + 2), C <= 65536  others become their mean
                      (uint16 when C > 256)
    vote      votes   (b,) uint8: each row's top class,   at most 1/2 (C <= 16), by design: the row becomes
                      packed (two per byte when C <= 16,  1 (C <= 256) or 2,     one-hot on its top class
                      one, or two little-endian), then    less what zlib saves
                      zlib-compressed (level 9)

For a 10-class public set of 10000 samples that is 400 kB, 200 kB, 100 kB, 30 kB (k = 1) and at most 5 kB
(votes: about the entropy of the votes, 1-4 kB for a teacher that has seen a few classes).
`max_abs_error` states the per-entry bound of the rounding codecs; `simplex_tolerance` how far a
decoded row of a correct encoder can sum from 1. `decode` raises `MessageFormatError` on any wire
payload that does not match its codec's schema (names, dtypes, shapes, quanta sums, top-k indices).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import MessageFormatError

CODECS = ("float32", "float16", "uint8", "topk", "vote")
FLOAT_DTYPES: dict[str, np.dtype[np.floating[Any]]] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
WIRE_DTYPES = FLOAT_DTYPES  # the former name, kept for old imports
QUANTA = 255  # uint8: every row is split into this many quanta of probability


def encode(probs: np.ndarray, codec: str, top_k: int = 1) -> dict[str, np.ndarray]:
    """Probabilities `(m, C)` to the named wire arrays of `codec`.

    float32/float16 cast whatever they are given (the receiver validates it). uint8 and topk cannot
    represent junk, so they first require finite, non-negative rows summing to 1 (float32 tolerance)
    and raise `MessageFormatError` otherwise; they quantise the rows renormalised in float64.
    """
    _check_codec(codec)
    if codec in FLOAT_DTYPES:
        return {"probs": np.ascontiguousarray(probs, dtype=FLOAT_DTYPES[codec])}
    rows = np.asarray(probs, dtype=np.float64)  # (m, C)
    if rows.ndim != 2:
        raise MessageFormatError(f"soft-labels: codec {codec} encodes an (m, C) matrix, got shape {rows.shape}")
    require_simplex(rows, simplex_tolerance("float32", rows.shape[1]))
    sums = rows.sum(axis=1, keepdims=True)
    rows = rows / np.where(sums > 0, sums, 1.0)  # sums are 1 +- 1e-4 here; exactly 1 up to float64 rounding
    if codec == "uint8":
        return {"quanta": _largest_remainder(rows)}
    if codec == "vote":
        return {"votes": _packed_votes(np.argmax(rows, axis=1), rows.shape[1])}  # ties: the lower class
    _check_top_k(top_k, rows.shape[1])
    indices = np.argsort(-rows, axis=1, kind="stable")[:, :top_k]  # (m, k) largest first, ties: lower class
    values = np.take_along_axis(rows, indices, axis=1)  # (m, k)
    return {
        "values": np.ascontiguousarray(values, dtype=np.float16),
        "indices": np.ascontiguousarray(indices, dtype=_index_dtype(rows.shape[1])),
    }


def decode(
    arrays: Mapping[str, np.ndarray], codec: str, num_classes: int, top_k: int = 1, *, num_rows: int | None = None,
) -> npt.NDArray[np.float32]:
    """Named wire arrays of `codec` back to float32 probabilities `(m, C)`.

    Checks the array names, shapes (`(num_rows, ...)` when given, else the rows of the first array)
    and dtypes, then the codec's own invariants; anything off raises `MessageFormatError`.
    Rows are not checked to be on the simplex here for float codecs: `require_simplex` does that.
    """
    _check_codec(codec)
    if codec == "topk":
        _check_top_k(top_k, num_classes)
    expected = wire_schema(codec, num_classes, top_k)
    if sorted(arrays) != sorted(expected):
        raise MessageFormatError(
            f"soft-labels: codec {codec} sends arrays {sorted(expected)}, got {sorted(arrays)}"
        )
    if codec == "vote":  # a byte stream: its rows are the query's, never read off the stream
        return _decode_votes(arrays["votes"], num_classes, num_rows)
    if num_rows is None:
        first = arrays[next(iter(expected))]
        num_rows = first.shape[0] if first.ndim else 0
    for name, (dtype, width) in expected.items():
        _check_array(arrays[name], codec, name if len(expected) > 1 else None, dtype, (num_rows, width))
    if codec in FLOAT_DTYPES:
        return arrays["probs"].astype(np.float32)
    if codec == "uint8":
        return _decode_quanta(arrays["quanta"])
    return _decode_topk(arrays["values"], arrays["indices"], num_classes)


def wire_schema(codec: str, num_classes: int, top_k: int = 1) -> dict[str, tuple[np.dtype[Any], int]]:
    """The arrays `codec` puts on the wire: name -> (dtype, columns); every array has one row per sample, but vote's
    one compressed byte stream (columns 0)."""
    _check_codec(codec)
    if codec in FLOAT_DTYPES:
        return {"probs": (FLOAT_DTYPES[codec], num_classes)}
    if codec == "uint8":
        return {"quanta": (np.dtype(np.uint8), num_classes)}
    if codec == "vote":
        return {"votes": (np.dtype(np.uint8), 0)}
    return {"values": (np.dtype(np.float16), top_k), "indices": (_index_dtype(num_classes), top_k)}


def simplex_tolerance(codec: str, num_classes: int, top_k: int = 1) -> float:
    """Largest |row sum - 1| a correct encoder can produce after decoding, and at least 1e-4.

    float16: C entries each rounded by at most half an ulp near 1; we allow a whole ulp, C * 2^-10.
    float32, uint8: float32 rounding of C entries (uint8 quanta sum to exactly 255), C * 2^-23.
    topk: the k float16 values are rounded (k * 2^-10); the spread rest is float32 rounding.
    """
    _check_codec(codec)
    if codec == "float16":
        return max(1e-4, num_classes * float(np.finfo(np.float16).eps))
    if codec == "topk":
        return max(1e-4, top_k * float(np.finfo(np.float16).eps), num_classes * float(np.finfo(np.float32).eps))
    return max(1e-4, num_classes * float(np.finfo(np.float32).eps))


def max_abs_error(codec: str, num_classes: int, top_k: int = 1) -> float | None:
    """Bound on |decode(encode(p)) - p| per entry for a row p on the simplex; None for topk.

    float32 / float16: rounding to nearest moves p in [0, 1] by at most half the spacing of the
    format at 1, eps / 2: 2^-24 (~6e-8) and 2^-11 (~4.9e-4). (Below 1 the spacing halves, so the
    true bound is eps / 4; we state the safer eps / 2.)

    uint8: with x_i = 255 p_i, f_i = x_i - floor(x_i), and r = 255 - sum floor(x_i) = sum f_i (an
    integer in [0, C - 1]), largest-remainder rounding gives the r entries with the largest f_i one
    more quantum. A kept-down entry errs by f_i / 255 and a bumped one by (1 - f_i) / 255. A kept-down
    f cannot exceed r / (r + 1): the r bumped entries are >= f, so r >= (r + 1) f. A bumped f is at
    least 1 / (C - r + 1): the other r - 1 bumped add up to at most r - 1, so the C - r + 1 entries
    <= f add up to at least 1. Both give |q_i / 255 - p_i| <= (1 - 1 / C) / 255 < 1 / 255; with the
    float32 rounding of q / 255 (<= 2^-25) the error stays under 1 / 255 for any C < 2^16. Rows are
    renormalised in float64 first, so the bound is against p / sum(p).

    topk: lossy by design, so no bound. The k kept entries are exact up to float16 rounding (<= 2^-11
    each); the other C - k are all replaced by their mean (1 - sum of kept values) / (C - k).
    vote: lossy by design, so no bound: the row becomes one-hot on its largest entry.
    """
    _check_codec(codec)
    if codec in FLOAT_DTYPES:
        return float(np.finfo(FLOAT_DTYPES[codec]).eps) / 2
    if codec == "uint8":
        return 1.0 / QUANTA
    return None


def require_simplex(probs: np.ndarray, tolerance: float) -> None:
    """Raise `MessageFormatError` unless every row of `(m, C)` is finite, non-negative and sums to 1 +- tolerance."""
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        raise MessageFormatError(f"soft-labels: {bad} rows hold NaN or inf; send finite probabilities")
    if (probs < 0).any():
        raise MessageFormatError(f"soft-labels: negative values (min {probs.min():.3g}); send probabilities")
    sums = probs.sum(axis=1, dtype=np.float64)
    off = np.abs(sums - 1.0) > tolerance
    if off.any():
        raise MessageFormatError(
            f"soft-labels: {int(off.sum())} rows do not sum to 1 (worst {sums[np.argmax(np.abs(sums - 1.0))]:.6f}, "
            f"tolerance {tolerance:.1e}); send softmax probabilities, not logits"
        )


def _largest_remainder(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """Rows on the simplex `(m, C)` float64 to uint8 quanta summing to exactly 255 per row.

    Each entry gets floor(255 p); the r quanta left over go to the r largest remainders, ties to the
    lower class index (a stable sort).
    """
    scaled = rows * QUANTA
    floors = np.floor(scaled)
    left: npt.NDArray[np.int64] = QUANTA - floors.sum(axis=1).astype(np.int64)  # (m,) in [0, C - 1]
    order = np.argsort(-(scaled - floors), axis=1, kind="stable")  # (m, C) largest remainder first
    ranks = np.argsort(order, axis=1)  # (m, C) rank of each class's remainder, 0 = largest
    quanta = floors.astype(np.int64) + (ranks < left[:, None])
    if (quanta.sum(axis=1) != QUANTA).any() or (quanta < 0).any() or (quanta > QUANTA).any():
        raise MessageFormatError("soft-labels: uint8 rounding did not give rows of 255 quanta (encoder bug)")
    return quanta.astype(np.uint8)


def _decode_quanta(quanta: np.ndarray) -> npt.NDArray[np.float32]:
    sums = quanta.sum(axis=1, dtype=np.int64)
    bad = int((sums != QUANTA).sum())
    if bad:
        raise MessageFormatError(
            f"soft-labels: {bad} rows of uint8 quanta do not sum to {QUANTA}; encode with largest-remainder rounding"
        )
    return (quanta / QUANTA).astype(np.float32)


def _decode_topk(values: np.ndarray, indices: np.ndarray, num_classes: int) -> npt.NDArray[np.float32]:
    """Kept values `(m, k)` in place; the rest of each row's mass spread evenly over the other classes."""
    m, k = values.shape
    idx = indices.astype(np.int64)
    if (idx >= num_classes).any():
        bad = int((idx >= num_classes).any(axis=1).sum())
        raise MessageFormatError(f"soft-labels: {bad} rows hold class indices >= num-classes {num_classes}")
    ordered = np.sort(idx, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        bad = int((ordered[:, 1:] == ordered[:, :-1]).any(axis=1).sum())
        raise MessageFormatError(f"soft-labels: {bad} rows repeat a class index; top-k indices must be distinct")
    kept = values.astype(np.float64)  # (m, k)
    if not np.isfinite(kept).all():
        bad = int((~np.isfinite(kept)).any(axis=1).sum())
        raise MessageFormatError(f"soft-labels: {bad} rows hold NaN or inf; send finite probabilities")
    if (kept < 0).any():
        raise MessageFormatError(f"soft-labels: negative values (min {kept.min():.3g}); send probabilities")
    mass = kept.sum(axis=1)  # (m,)
    tolerance = simplex_tolerance("topk", num_classes, k)
    if (mass > 1.0 + tolerance).any():
        raise MessageFormatError(
            f"soft-labels: {int((mass > 1.0 + tolerance).sum())} rows have top-{k} values summing to more than 1 "
            f"(worst {mass.max():.6f}, tolerance {tolerance:.1e}); send the k largest probabilities, not logits"
        )
    spread = np.clip(1.0 - mass, 0.0, None) / (num_classes - k) if k < num_classes else np.zeros(m)
    probs = np.repeat(spread[:, None], num_classes, axis=1)  # (m, C)
    np.put_along_axis(probs, idx, kept, axis=1)
    return probs.astype(np.float32)


def _packed_votes(votes: np.ndarray, num_classes: int) -> npt.NDArray[np.uint8]:
    """Class ids `(m,)` as one zlib stream: two per byte (high nibble first) when C <= 16, else one byte or two
    little-endian bytes each."""
    width = _vote_width(num_classes)
    if width == 0:
        padded = np.append(votes, 0) if len(votes) % 2 else votes
        raw = (padded[0::2].astype(np.uint8) << 4 | padded[1::2].astype(np.uint8)).tobytes()
    else:
        raw = votes.astype("<u1" if width == 1 else "<u2").tobytes()
    return np.frombuffer(zlib.compress(raw, 9), dtype=np.uint8).copy()


def _decode_votes(stream: np.ndarray, num_classes: int, num_rows: int | None) -> npt.NDArray[np.float32]:
    """A vote stream back to one-hot rows `(num_rows, C)`: it must inflate to exactly the packed votes of
    `num_rows` rows (inflating stops there: no stream can blow up), each vote a class id < C."""
    if stream.ndim != 1 or stream.dtype != np.uint8:
        raise MessageFormatError(f"soft-labels: codec vote sends one uint8 byte stream, got {stream.dtype} {stream.shape}")
    if num_rows is None:
        raise MessageFormatError("soft-labels: codec vote needs the number of rows the query asked for")
    width = _vote_width(num_classes)
    size = (num_rows + 1) // 2 if width == 0 else num_rows * width
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(stream.tobytes(), size + 1)
    except zlib.error as error:
        raise MessageFormatError(f"soft-labels: the vote stream does not inflate ({error}); send zlib-compressed votes") from None
    if len(raw) != size or not inflater.eof or inflater.unused_data:
        raise MessageFormatError(f"soft-labels: the vote stream holds {len(raw)}{'+' if len(raw) > size else ''} bytes "
                                 f"{'and does not end there ' if not inflater.eof else ''}"
                                 f"for {num_rows} rows, expected exactly {size}; send one vote per queried sample")
    packed = np.frombuffer(raw, dtype=np.uint8)
    if width == 0:
        votes = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[:num_rows].astype(np.int64)
        if num_rows % 2 and packed[-1] & 0x0F:
            raise MessageFormatError("soft-labels: the vote stream's padding nibble is not 0")
    else:
        votes = np.frombuffer(raw, dtype="<u1" if width == 1 else "<u2").astype(np.int64)
    if (votes >= num_classes).any():
        raise MessageFormatError(f"soft-labels: {int((votes >= num_classes).sum())} votes name a class >= num-classes "
                                 f"{num_classes}")
    probs = np.zeros((num_rows, num_classes), dtype=np.float32)
    probs[np.arange(num_rows), votes] = 1.0
    return probs


def _vote_width(num_classes: int) -> int:
    """Bytes per vote on the wire before compression: 0 for two per byte (C <= 16), else 1 or 2."""
    if num_classes > 65536:
        raise MessageFormatError(f"soft-labels: codec vote carries at most 65536 classes, got {num_classes}; use topk")
    return 0 if num_classes <= 16 else 1 if num_classes <= 256 else 2


def _check_array(array: np.ndarray, codec: str, name: str | None, dtype: np.dtype[Any], shape: tuple[int, int]) -> None:
    what = f"soft-labels {name!r}" if name else "soft-labels"
    if array.shape != shape:
        raise MessageFormatError(f"{what}: expected shape {shape}, got {array.shape}")
    if array.dtype != dtype:
        of = f" for {name!r}" if name else ""
        raise MessageFormatError(f"soft-labels: codec {codec} expects dtype {dtype}{of}, got {array.dtype}")


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise MessageFormatError(f"unknown codec {codec!r}; known codecs: {', '.join(CODECS)}")


def _check_top_k(top_k: int, num_classes: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_classes:
        raise MessageFormatError(f"top-k must be an integer in [1, num-classes = {num_classes}], got {top_k!r}")


def _index_dtype(num_classes: int) -> np.dtype[np.unsignedinteger[Any]]:
    """Smallest unsigned integer dtype that holds class indices 0 .. C - 1."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if num_classes <= 65536 else np.dtype(np.uint32)
