"""Streaming aggregation: fold each institution's rows into the round's aggregate as its reply arrives.

The server judges replies one at a time (server/exchange.py) and folds each accepted one here at once, so it does
not hold every reply until the last. A rule that is a sum of the institutions' rows, each weighed by what its own
reply carries, keeps running sums whose size does not grow with the number k of institutions (`RunningSum`); a rule
that needs every row holds the rows (`HeldRows`) and runs the batch rule at the end. Either way the result is
`aggregate`'s (batch.py) on the same replies: bit for bit for `mean` in arrival order, to float rounding (1e-12)
for the other sums, which add in another order.

    rule                            state while replies arrive (q_j: institution j's rows, renormalised)
    mean, era, selective            S = sum_j q_j (n, C); era and selective read only the mean S / k
    weighted                        S = sum_j m_j q_j (n, C), and sum_j m_j
    confidence                      S = sum_j w_ji q_ji (n, C), W = sum_j w_ji (n,), P = sum_j q_j (n, C)
    expertise                       S = sum_j n_jc q_jic (n, C), N = sum_j n_jc (C,), P = sum_j q_j (n, C)
    balanced-expertise              as expertise, on each reply's prior-corrected rows
    inferred-expertise              as balanced-expertise, with n_jc = sum_i q_jic from the reply's own rows
    median, trimmed-mean            every reply's rows as received: order statistics need them all
    weighted rules, weight-clip > 0 every reply's rows: the cap, weight-clip times the lower median of all the
                                    declared sizes, is known only once the last reply is in

Each institution's agreed `max-examples` (its own cap, known when its reply arrives) is applied as it is folded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from common.aggregation.averaging import confidence_weights, inferred_counts, prior_corrected, sharpened
from common.aggregation.base import Aggregate, AggregationParams, count_bad_rows, to_aggregate
from common.aggregation.batch import NEEDS_CLASS_COUNTS, RULES, WEIGHTED_RULES, aggregate
from common.aggregation.filtering import decided
from common.aggregation.weights import ClippedWeight, clip_weights
from common.errors import ConfigError, MessageFormatError, QuorumError

Floats = npt.NDArray[np.float64]
SUMMED: frozenset[str] = frozenset({"mean", "era", "selective", "weighted", "confidence", "expertise", "balanced-expertise",
                                    "inferred-expertise"})
# keep P: rows or classes may need the mean
_FALLS_BACK = frozenset({"confidence", "expertise", "balanced-expertise", "inferred-expertise"})
_DEFAULT_PARAMS = AggregationParams()


class RunningAggregate(Protocol):
    """One round's aggregate, built one reply at a time."""

    @property
    def count(self) -> int: ...

    def fold(self, rows: np.ndarray, num_examples: float, class_counts: np.ndarray | None = None,
             cap: float = math.inf) -> None:
        """Add one institution: its rows `(n, C)`, its declared size, its per-class counts (or None) and its agreed
        largest size (`cap`, inf where none). Raises MessageFormatError (ConfigError for a missing count or a bad cap)
        and then leaves the aggregate as it was."""

    def result(self) -> Aggregate:
        """The ensemble target of everything folded; QuorumError when nothing was."""


def running_aggregate(rule: str, params: AggregationParams = _DEFAULT_PARAMS) -> RunningAggregate:
    """The running aggregate of `rule`: running sums where the rule allows it, every row where it needs them."""
    if rule not in RULES:
        raise ConfigError(f"unknown aggregation {rule!r}; known rules: {', '.join(sorted(RULES))}")
    if rule in SUMMED and not (rule in WEIGHTED_RULES and params.weight_clip > 0):
        return RunningSum(rule, params)
    return HeldRows(rule, params)


@dataclass
class RunningSum:
    """A rule computed from sums of weighted rows: S = sum_j w_j * q_j, its weight sum_j w_j, and, for the rules
    that may fall back on the plain mean, P = sum_j q_j. Nothing per institution but the clipped sizes."""

    rule: str
    params: AggregationParams = _DEFAULT_PARAMS
    count: int = 0
    total: Floats | None = None  # (n, C) float64: S
    weight: Floats | None = None  # sum of the weights: () mean and weighted, (n, 1) confidence, (1, C) expertise
    plain: Floats | None = None  # (n, C) float64: P, where the rule may need it (weighted: while every weight is 0)
    clipped: list[ClippedWeight] = field(default_factory=list)  # the institutions whose size was capped

    def fold(self, rows: np.ndarray, num_examples: float, class_counts: np.ndarray | None = None,
             cap: float = math.inf) -> None:
        q = checked_rows(rows, None if self.total is None else self.total.shape)
        q = q / q.sum(axis=1, keepdims=True)  # (n, C), as `aggregate` renormalises each row
        size, counts = checked_size(num_examples, class_counts, q.shape[1])
        size, counts, clip = _capped(self.rule, size, counts, cap, self.count)
        weight, summed = self._weighed(q, size, counts)
        if self.total is None or self.weight is None:
            self.total, self.weight = np.zeros_like(q), np.zeros_like(weight)
        self.total += weight * summed
        self.weight = self.weight + weight
        if self.rule in _FALLS_BACK or (self.rule == "weighted" and not self.weight.any()):
            self.plain = summed.copy() if self.plain is None else self.plain + summed
        elif self.plain is not None:  # weighted: a weight > 0 arrived, the plain mean will not be needed
            self.plain = None
        if clip is not None:
            self.clipped.append(clip)
        self.count += 1

    def _weighed(self, q: Floats, size: float, counts: Floats | None) -> tuple[Floats, Floats]:
        """(this institution's weight, the rows to add): 1 or its size (a number), its confidence per row `(n, 1)`, or
        its class counts per class `(1, C)` (inferred-expertise: its rows' own); the balanced rules add the
        prior-corrected rows."""
        if self.rule == "inferred-expertise":
            counts = inferred_counts(q[None])[0]
            return counts[None, :], prior_corrected(q[None], counts[None], self.params.temperature)[0]
        if self.rule in NEEDS_CLASS_COUNTS:
            if counts is None:
                raise ConfigError(f"aggregation {self.rule!r} needs every institution's class counts; ask for them "
                                  "in the query (want_class_counts) and pass them to fold()")
            if self.rule == "balanced-expertise":
                q = prior_corrected(q[None], counts[None], self.params.temperature)[0]
            return counts[None, :], q
        if self.rule == "confidence":
            return confidence_weights(q)[:, None], q
        return np.asarray(size if self.rule == "weighted" else 1.0), q

    def result(self) -> Aggregate:
        if self.total is None or self.weight is None:
            raise QuorumError("no soft labels to aggregate: every reply was rejected or missing")
        total, weight, params = self.total, self.weight, self.params
        if self.rule in ("mean", "era", "selective"):
            mean = total / self.count  # (n, C): `stack.mean(axis=0)`, bit for bit in the same order
            if self.rule == "era":
                return to_aggregate(sharpened(mean, params.era_temperature), mean[None])
            keep = decided(mean, params.temperature, params.selective_threshold) if self.rule == "selective" else None
            return to_aggregate(mean, mean[None], keep)
        if self.rule == "weighted" and self.plain is None:  # some weight > 0: S / sum of the weights
            weighted = total / weight
            result = to_aggregate(weighted, weighted[None])
        else:  # confidence and expertise: the plain mean P / k where a row's or class's weight is 0 (weighted: all)
            plain = (total if self.plain is None else self.plain) / self.count
            held = weight > 0
            result = to_aggregate(np.where(held, total / np.where(held, weight, 1.0), plain), plain[None])
        return replace(result, clipped=tuple(self.clipped)) if self.clipped else result


@dataclass
class HeldRows:
    """A rule that needs every row: each reply's rows held as received (with its size, counts and cap), and the batch
    rule run on them at the end."""

    rule: str
    params: AggregationParams = _DEFAULT_PARAMS
    rows: list[np.ndarray] = field(default_factory=list)  # k arrays (n, C), as received
    sizes: list[float] = field(default_factory=list)
    counts: list[Floats | None] = field(default_factory=list)
    caps: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.rows)

    def fold(self, rows: np.ndarray, num_examples: float, class_counts: np.ndarray | None = None,
             cap: float = math.inf) -> None:
        checked_rows(rows, np.shape(self.rows[0]) if self.rows else None)
        size, counts = checked_size(num_examples, class_counts, np.shape(rows)[1])
        _capped(self.rule, size, counts, cap, self.count)  # a bad cap is refused now, not after the last reply
        self.rows.append(np.asarray(rows))
        self.sizes.append(size)
        self.counts.append(counts)
        self.caps.append(float(cap))

    def result(self) -> Aggregate:
        counts = None if any(c is None for c in self.counts) else [c for c in self.counts if c is not None]
        caps = None if all(math.isinf(c) for c in self.caps) else self.caps
        return aggregate(self.rule, self.rows, self.sizes, counts, self.params, caps)


def checked_rows(rows: np.ndarray, shape: tuple[int, ...] | None) -> Floats:
    """One institution's rows as float64 `(n, C)`, of the `shape` of those folded before, holding probabilities."""
    q = np.asarray(rows, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] < 1 or q.shape[1] < 1:
        raise MessageFormatError(f"soft labels must be (n, C) with n >= 1 and C >= 1, got shape {q.shape}")
    if shape is not None and q.shape != shape:
        raise MessageFormatError(f"soft labels differ in shape: {q.shape}, the replies before had {shape}; every "
                                 "institution must answer the same query")
    if bad := count_bad_rows(q):
        raise MessageFormatError(f"soft labels: {bad} rows hold NaN, inf, negative values or no mass; send probabilities")
    return q


def checked_size(num_examples: float, class_counts: np.ndarray | None, num_classes: int) -> tuple[float, Floats | None]:
    """An institution's declared size, finite and >= 0, and its class counts `(C,)` float64, finite and >= 0."""
    size = float(num_examples)
    if not (math.isfinite(size) and size >= 0):
        raise MessageFormatError(f"num_examples: the count must be finite and >= 0, got {num_examples}")
    if class_counts is None:
        return size, None
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (num_classes,):
        raise MessageFormatError(f"class counts: expected shape ({num_classes},), got {counts.shape}")
    if not (np.isfinite(counts).all() and (counts >= 0).all()):
        raise MessageFormatError("class counts: counts must be finite and >= 0")
    return size, counts


def _capped(rule: str, size: float, counts: Floats | None, cap: float,
            index: int) -> tuple[float, Floats | None, ClippedWeight | None]:
    """A weighted rule's size and counts capped at the institution's agreed `cap`, as `clip_weights` caps them (the
    median clip is off here), and the clip to record (at `index`, its position among the folded replies)."""
    if rule not in WEIGHTED_RULES:
        return size, counts, None
    used, scaled, clipped = clip_weights(np.array([size]), None if counts is None else counts[None, :], 0.0,
                                         np.array([cap], dtype=np.float64))
    return float(used[0]), None if scaled is None else scaled[0], replace(clipped[0], index=index) if clipped else None
