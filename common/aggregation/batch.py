"""The batch entry point: every institution's rows at once -> one ensemble target (the rules by name, `aggregate`).

`aggregate` validates the inputs once, stacks the k institutions' `(n, C)` rows into `(k, n, C)` float64 (each
row renormalised), caps the declared sizes of the weighted rules, and hands them to the named rule. The server
folds replies as they arrive instead (streaming.py); the rules that need every row end here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from common.aggregation.averaging import (
    balanced_expertise_rule,
    confidence_rule,
    era_rule,
    expertise_rule,
    inferred_expertise_rule,
    mean_rule,
    weighted_rule,
)
from common.aggregation.base import Aggregate, AggregationParams, Rule, RuleInput, count_bad_rows
from common.aggregation.filtering import selective_rule
from common.aggregation.robust import median_rule, trimmed_mean_rule
from common.aggregation.weights import ClippedWeight, clip_weights
from common.errors import ConfigError, MessageFormatError, QuorumError

RULES: dict[str, Rule] = {
    "mean": mean_rule,
    "weighted": weighted_rule,
    "confidence": confidence_rule,
    "era": era_rule,
    "expertise": expertise_rule,
    "balanced-expertise": balanced_expertise_rule,
    "inferred-expertise": inferred_expertise_rule,
    "median": median_rule,
    "trimmed-mean": trimmed_mean_rule,
    "selective": selective_rule,
}
NEEDS_INDIVIDUAL_ROWS: frozenset[str] = frozenset(RULES) - {"mean", "weighted"}
NEEDS_CLASS_COUNTS: frozenset[str] = frozenset({"expertise", "balanced-expertise"})  # the query must ask for per-class counts
WEIGHTED_RULES: frozenset[str] = frozenset({"weighted", "expertise", "balanced-expertise"})  # weigh by declared sizes
_DEFAULT_PARAMS = AggregationParams()  # frozen, so one shared default is safe


def aggregate(
    rule: str,
    soft_labels: list[np.ndarray],
    num_examples: Sequence[float],
    class_counts: list[np.ndarray] | None = None,
    params: AggregationParams = _DEFAULT_PARAMS,
    max_examples: Sequence[float] | None = None,
) -> Aggregate:
    """Apply the named rule to k institutions' soft labels `(n, C)`; `num_examples` and `class_counts` per institution.

    A rule of `WEIGHTED_RULES` gets the declared sizes capped first (`params.weight_clip` times their lower
    median, and `max_examples`: each institution's agreed largest size, inf where none); the result's
    `clipped` names every institution whose size was capped.

    Raises ConfigError (unknown rule, bad params, `expertise` without class counts), QuorumError (no
    soft labels) or MessageFormatError (shapes, values or counts that do not fit together).
    """
    if rule not in RULES:
        raise ConfigError(f"unknown aggregation {rule!r}; known rules: {', '.join(sorted(RULES))}")
    if not isinstance(params, AggregationParams):
        raise ConfigError(f"aggregation params must be an AggregationParams, got {type(params).__name__}")
    if not soft_labels:
        raise QuorumError("no soft labels to aggregate: every reply was rejected or missing")
    stack = _stack(soft_labels)  # (k, n, C)
    k, _, num_classes = stack.shape
    sizes = _per_institution(num_examples, k)
    counts = None if class_counts is None else _class_counts(class_counts, k, num_classes)
    clipped: tuple[ClippedWeight, ...] = ()
    if rule in WEIGHTED_RULES:
        caps = None if max_examples is None else np.asarray(max_examples, dtype=np.float64)
        sizes, counts, clipped = clip_weights(sizes, counts, params.weight_clip, caps)
    result = RULES[rule](RuleInput(stack=stack, num_examples=sizes, class_counts=counts, params=params))
    return replace(result, clipped=clipped) if clipped else result


def _stack(soft_labels: Sequence[np.ndarray]) -> npt.NDArray[np.float64]:
    """`(k, n, C)` float64 of the institutions' rows, each clipped at 0 and renormalised (float16 sums drift)."""
    shapes = {np.shape(s) for s in soft_labels}
    if len(shapes) != 1:
        raise MessageFormatError(
            f"soft labels differ in shape: {sorted(shapes)}; every institution must answer the same query"
        )
    (shape,) = shapes
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise MessageFormatError(f"soft labels must be (n, C) with n >= 1 and C >= 1, got shape {shape}")
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in soft_labels])  # (k, n, C)
    for j, rows in enumerate(stack):
        if bad := count_bad_rows(rows):
            raise MessageFormatError(
                f"soft labels of institution {j}: {bad} rows hold NaN, inf, negative values or no mass; "
                "send probabilities"
            )
    normalised: npt.NDArray[np.float64] = stack / stack.sum(axis=2, keepdims=True)  # (k, n, C)
    return normalised


def _per_institution(num_examples: Sequence[float], k: int) -> np.ndarray:
    """`(k,)` float64 partition sizes, one per institution, finite and >= 0."""
    sizes = np.asarray(num_examples, dtype=np.float64)
    if sizes.shape != (k,):
        raise MessageFormatError(f"num_examples: expected one count per institution, shape ({k},), got {sizes.shape}")
    if not (np.isfinite(sizes).all() and (sizes >= 0).all()):
        raise MessageFormatError("num_examples: every count must be finite and >= 0")
    return sizes


def _class_counts(class_counts: Sequence[np.ndarray], k: int, num_classes: int) -> np.ndarray:
    """`(k, C)` float64 per-class sample counts, one `(C,)` row per institution, finite and >= 0."""
    if len(class_counts) != k:
        raise MessageFormatError(f"class counts: expected one array per institution ({k}), got {len(class_counts)}")
    for j, counts in enumerate(class_counts):
        if np.shape(counts) != (num_classes,):
            raise MessageFormatError(
                f"class counts of institution {j}: expected shape ({num_classes},), got {np.shape(counts)}"
            )
    counts = np.stack([np.asarray(c, dtype=np.float64) for c in class_counts])  # (k, C)
    if not (np.isfinite(counts).all() and (counts >= 0).all()):
        bad = [j for j, row in enumerate(counts) if not (np.isfinite(row).all() and (row >= 0).all())]
        raise MessageFormatError(f"class counts of institutions {bad}: counts must be finite and >= 0")
    return counts
