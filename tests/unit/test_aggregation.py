"""Unit tests of common/aggregation.py: soft labels of many institutions -> one ensemble target."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.aggregation import aggregate
from common.errors import ConfigError, QuorumError


def test_mean_of_two_institutions() -> None:
    # Prepare
    first = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]], dtype=np.float32)
    second = np.array([[0.0, 1.0], [0.5, 0.5], [0.6, 0.4]], dtype=np.float32)

    # Execute
    ensemble = aggregate("mean", [first, second], [100, 100])

    # Assert
    expected = np.array([[0.5, 0.5], [0.5, 0.5], [0.4, 0.6]], dtype=np.float32)
    np.testing.assert_allclose(ensemble, expected, atol=1e-7)


def test_mean_of_three_institutions_golden_value() -> None:
    # Prepare
    soft_labels = [
        np.array([[0.6, 0.3, 0.1]], dtype=np.float32),
        np.array([[0.0, 1.0, 0.0]], dtype=np.float32),
        np.array([[0.3, 0.2, 0.5]], dtype=np.float32),
    ]

    # Execute
    ensemble = aggregate("mean", soft_labels, [1, 1, 1])

    # Assert
    np.testing.assert_allclose(ensemble, [[0.3, 0.5, 0.2]], atol=1e-7)


def test_mean_ignores_example_counts() -> None:
    # Prepare
    soft_labels = [np.array([[1.0, 0.0]], dtype=np.float32), np.array([[0.0, 1.0]], dtype=np.float32)]

    # Execute
    balanced = aggregate("mean", soft_labels, [10, 10])
    skewed = aggregate("mean", soft_labels, [1, 10_000])

    # Assert
    np.testing.assert_array_equal(balanced, skewed)
    np.testing.assert_allclose(skewed, [[0.5, 0.5]])


def test_result_is_float32_of_the_input_shape() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    soft_labels = [rng.dirichlet(np.ones(10), size=7).astype(np.float16) for _ in range(4)]

    # Execute
    ensemble = aggregate("mean", soft_labels, [5, 6, 7, 8])

    # Assert
    assert ensemble.dtype == np.float32
    assert ensemble.shape == (7, 10)
    np.testing.assert_allclose(ensemble.sum(axis=1), 1.0, atol=1e-6)


def test_single_institution_is_returned_renormalised() -> None:
    # Prepare: a float16 row that sums to 1 only within the codec tolerance
    row = np.array([[0.3333, 0.3333, 0.3333]], dtype=np.float16)

    # Execute
    ensemble = aggregate("mean", [row], [1])

    # Assert
    np.testing.assert_allclose(ensemble, [[1 / 3, 1 / 3, 1 / 3]], atol=1e-7)


def test_inputs_are_not_modified() -> None:
    # Prepare
    first = np.array([[0.25, 0.75]], dtype=np.float32)
    second = np.array([[0.75, 0.25]], dtype=np.float32)
    copies = [first.copy(), second.copy()]

    # Execute
    aggregate("mean", [first, second], [1, 1])

    # Assert
    np.testing.assert_array_equal(first, copies[0])
    np.testing.assert_array_equal(second, copies[1])


@pytest.mark.parametrize("soft_labels", [[np.full((1, 2), 0.5)], []], ids=["with-labels", "empty"])
def test_unknown_rule_is_a_config_error(soft_labels) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown aggregation 'median'; known rules: mean"):
        aggregate("median", soft_labels, [1] * len(soft_labels))


def test_no_soft_labels_is_a_quorum_error() -> None:
    # Execute / Assert
    with pytest.raises(QuorumError, match="no soft labels to aggregate: every reply was rejected or missing"):
        aggregate("mean", [], [])


def test_soft_labels_of_different_shapes_are_refused() -> None:
    # Prepare
    soft_labels = [np.full((2, 2), 0.5), np.full((3, 2), 0.5)]

    # Execute / Assert: replies are validated against the query before they get here, so this is a
    # programming error (ValueError), not a FedstillError
    with pytest.raises(ValueError, match=r"soft labels differ in shape: \[\(2, 2\), \(3, 2\)\]"):
        aggregate("mean", soft_labels, [1, 1])


@st.composite
def simplex_stacks(draw) -> list[np.ndarray]:
    """k institutions' `(n, C)` rows on the simplex, in a wire-like dtype."""
    k = draw(st.integers(1, 6))
    n = draw(st.integers(1, 8))
    c = draw(st.integers(2, 12))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    weights = draw(hnp.arrays(np.float64, (k, n, c), elements=st.floats(0.0, 1.0)))
    empty = weights.sum(axis=2) == 0
    weights[empty, 0] = 1.0  # an all-zero row becomes one-hot
    rows = weights / weights.sum(axis=2, keepdims=True)
    return [rows[j].astype(dtype) for j in range(k)]


@settings(max_examples=60, deadline=None)
@given(soft_labels=simplex_stacks())
def test_any_stack_on_the_simplex_aggregates_to_the_simplex(soft_labels: list[np.ndarray]) -> None:
    # Prepare
    num_examples = [10] * len(soft_labels)

    # Execute
    ensemble = aggregate("mean", soft_labels, num_examples)

    # Assert
    assert ensemble.dtype == np.float32
    assert ensemble.shape == soft_labels[0].shape
    assert np.isfinite(ensemble).all()
    assert (ensemble >= 0).all()
    np.testing.assert_allclose(ensemble.sum(axis=1, dtype=np.float64), 1.0, atol=1e-5)
    mean = np.mean([s.astype(np.float64) for s in soft_labels], axis=0)
    np.testing.assert_allclose(ensemble, mean / mean.sum(axis=1, keepdims=True), atol=1e-6)
