"""What every aggregation rule shares: its parameters, its input, its result, and the way back onto the simplex."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import numpy as np
import numpy.typing as npt

from common.aggregation.weights import ClippedWeight
from common.errors import ConfigError


@dataclass(frozen=True)
class AggregationParams:
    """Settings of the rules that have any; each rule reads only its own."""

    era_temperature: float = 0.1  # ERA sharpening temperature (< 1 sharpens)
    trim_fraction: float = 0.1  # trimmed mean: fraction cut at EACH end, per coordinate, in [0, 0.5)
    selective_threshold: float = 0.5  # selective: drop rows whose H(p)/log(C) exceeds this, in (0, 1]
    temperature: float = 1.0  # the temperature the soft labels were made at (selective judges at T = 1)
    weight_clip: float = 0.0  # weighted rules: cap each declared size at this multiple of the lower median (0: off)

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, float, Callable[[float], bool], str], ...] = (
            ("era_temperature", self.era_temperature, lambda v: v > 0,
             "a finite number > 0 (below 1 it sharpens the mean)"),
            ("trim_fraction", self.trim_fraction, lambda v: 0 <= v < 0.5,
             "in [0, 0.5): the fraction of institutions cut at each end"),
            ("selective_threshold", self.selective_threshold, lambda v: 0 < v <= 1,
             "in (0, 1]: the largest normalised entropy of a kept row (1 keeps every row)"),
            ("temperature", self.temperature, lambda v: v > 0, "a finite number > 0"),
            ("weight_clip", self.weight_clip, lambda v: v == 0 or v >= 1,
             "0 (off) or a multiple >= 1 of the lower median of the declared sizes"),
        )
        problems = [
            f"{name} must be {want}, got {value!r}"
            for name, value, ok, want in checks
            if not (_is_real(value) and math.isfinite(value) and ok(value))
        ]
        if problems:
            raise ConfigError("aggregation params: " + "; ".join(problems))


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Aggregate:
    """One round's ensemble target for the student."""

    probs: npt.NDArray[np.float32]  # (n, C) float32, every row on the simplex
    keep: npt.NDArray[np.bool_]  # (n,) bool: rows the student should learn from (all True except for `selective`)
    clipped: tuple[ClippedWeight, ...] = ()  # weighted rules: institutions whose declared size was capped


@dataclass(frozen=True)
class RuleInput:
    """A rule's view of one round, validated by `aggregate`; rules never modify it."""

    stack: npt.NDArray[np.float64]  # (k, n, C) float64, k institutions' rows, each on the simplex
    num_examples: npt.NDArray[np.float64]  # (k,) float64 >= 0, private partition sizes
    class_counts: npt.NDArray[np.float64] | None  # (k, C) float64 >= 0 private samples per class, or None if not reported
    params: AggregationParams


Rule = Callable[[RuleInput], Aggregate]


def to_aggregate(raw: np.ndarray, stack: np.ndarray, keep: np.ndarray | None = None) -> Aggregate:
    """Clip `raw` `(n, C)` at 0, renormalise each row, and cast to float32.

    A row left with no mass (a coordinate-wise median of one-hot rows on different classes, say)
    falls back to the plain mean of the institutions' rows, so every row ends on the simplex.
    """
    probs = np.clip(np.asarray(raw, dtype=np.float64), 0.0, None)  # (n, C)
    empty = ~(probs.sum(axis=1) > 0)
    if empty.any():
        probs[empty] = stack.mean(axis=0)[empty]
    probs /= probs.sum(axis=1, keepdims=True)
    if keep is None:
        keep = np.ones(probs.shape[0], dtype=bool)
    return Aggregate(probs=probs.astype(np.float32), keep=np.asarray(keep, dtype=bool))


def count_bad_rows(rows: np.ndarray) -> int:
    """How many rows of `rows` `(n, C)` hold NaN, inf or negative values, or have no mass: none may be aggregated."""
    sums = rows.sum(axis=1)
    return int((~np.isfinite(rows).all(axis=1) | (rows < 0).any(axis=1) | ~(sums > 0)).sum())


def entropy(probs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    r"""Shannon entropy in nats along the last axis, :math:`H(p) = -\sum_c p_c \log p_c`, with 0 log 0 = 0."""
    positive = probs > 0
    logs = np.log(np.where(positive, probs, 1.0))
    h: npt.NDArray[np.float64] = -np.sum(np.where(positive, probs * logs, 0.0), axis=-1)
    return h


def normalised_entropy(probs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """H(p) / log C in [0, 1] along the last axis: 0 for a one-hot row, 1 for the uniform row (0 when C = 1)."""
    num_classes = probs.shape[-1]
    if num_classes < 2:
        return np.zeros(probs.shape[:-1])
    normalised: npt.NDArray[np.float64] = np.clip(entropy(probs) / math.log(num_classes), 0.0, 1.0)
    return normalised
