"""Aggregation rules: many institutions' soft labels on the same public samples -> one ensemble target.

Plain numpy, independent of Flower. Every rule takes a stack `(k, n, C)` of k institutions' soft
labels (rows on the simplex) and returns `(n, C)` rows on the simplex.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.errors import ConfigError, QuorumError


def mean_rule(stack: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
    r"""Unweighted mean of the institutions' probabilities (the ensemble average of Hinton et al., 2015).

    .. math:: \bar q_{i} = \frac{1}{k} \sum_{j=1}^{k} q^{(j)}_{i}

    A mean of points on the simplex lies on the simplex. `num_examples` is unused here.
    """
    del num_examples
    return stack.mean(axis=0, dtype=np.float64)


AggregationRule = Callable[[np.ndarray, np.ndarray], np.ndarray]
RULES: dict[str, AggregationRule] = {"mean": mean_rule}


def aggregate(rule: str, soft_labels: list[np.ndarray], num_examples: list[int]) -> np.ndarray:
    """Apply the named rule to the institutions' soft labels; result `(n, C)` float32, rows sum to 1."""
    if rule not in RULES:
        raise ConfigError(f"unknown aggregation {rule!r}; known rules: {', '.join(sorted(RULES))}")
    if not soft_labels:
        raise QuorumError("no soft labels to aggregate: every reply was rejected or missing")
    shapes = {s.shape for s in soft_labels}
    if len(shapes) != 1:
        raise ValueError(f"soft labels differ in shape: {sorted(shapes)}")
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in soft_labels])  # (k, n, C)
    ensemble = RULES[rule](stack, np.asarray(num_examples, dtype=np.float64))
    ensemble = np.clip(ensemble, 0.0, None)
    ensemble /= ensemble.sum(axis=1, keepdims=True)
    return ensemble.astype(np.float32)
