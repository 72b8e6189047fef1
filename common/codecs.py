"""Soft-label codecs: how a `(n, C)` probability matrix is put on the wire and read back."""

from __future__ import annotations

import numpy as np

from common.errors import MessageFormatError

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
CODECS = tuple(WIRE_DTYPES)


def encode(probs: np.ndarray, codec: str) -> np.ndarray:
    """Probabilities `(n, C)` to the wire array of `codec`."""
    if codec not in WIRE_DTYPES:
        raise MessageFormatError(f"unknown codec {codec!r}; known codecs: {', '.join(WIRE_DTYPES)}")
    return np.ascontiguousarray(probs, dtype=WIRE_DTYPES[codec])


def decode(wire: np.ndarray, codec: str) -> np.ndarray:
    """Wire array of `codec` back to float32 probabilities `(n, C)`; checks the wire dtype."""
    if codec not in WIRE_DTYPES:
        raise MessageFormatError(f"unknown codec {codec!r}; known codecs: {', '.join(WIRE_DTYPES)}")
    if wire.dtype != WIRE_DTYPES[codec]:
        raise MessageFormatError(f"soft-labels: codec {codec} expects dtype {codec}, got {wire.dtype}")
    return wire.astype(np.float32)


def simplex_tolerance(codec: str, num_classes: int) -> float:
    """Largest |row sum - 1| a correct encoder can produce: C rounding errors of half an ulp near 1."""
    ulp = float(np.finfo(WIRE_DTYPES.get(codec, np.float32)).eps)
    return max(1e-4, num_classes * ulp)
