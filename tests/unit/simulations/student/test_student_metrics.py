"""Unit tests of simulations/student/metrics.py against hand-computed values: JS divergence and ECE."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.student.metrics import expected_calibration_error, js_divergence


def test_js_divergence_matches_hand_computed_values() -> None:
    # Prepare: m = (0.75, 0.25) for the third pair;
    # KL(p||m) = 0.5 log2(0.5/0.75) + 0.5 log2(0.5/0.25) = 0.2075187, KL(q||m) = log2(1/0.75) = 0.4150375
    p = np.array([[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]])
    q = np.array([[0.0, 1.0], [0.3, 0.7], [1.0, 0.0]])

    # Execute
    js = js_divergence(p, q)

    # Assert
    np.testing.assert_allclose(js, [1.0, 0.0, 0.5 * (0.2075187496 + 0.4150374993)], atol=1e-9)


def test_js_divergence_is_symmetric_and_bounded_by_one_bit() -> None:
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(10), size=50), rng.dirichlet(np.ones(10) * 0.1, size=50)

    forward, backward = js_divergence(p, q), js_divergence(q, p)

    np.testing.assert_allclose(forward, backward, atol=1e-12)
    assert np.all((forward >= 0) & (forward <= 1))


def test_js_divergence_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"got \(2, 3\) and \(2, 4\)"):
        js_divergence(np.full((2, 3), 1 / 3), np.full((2, 4), 0.25))


def test_ece_matches_a_hand_computed_value_with_right_closed_bins() -> None:
    # Prepare: 5 bins (0, .2], ..., (.8, 1]. Confidences .9 (right), .8 (wrong; the edge belongs to (.6, .8]),
    # .7 (right), .55 (right):
    #   (.8, 1]: 1/4 * |1 - .9|   = 0.025
    #   (.6, .8]: 2/4 * |.5 - .75| = 0.125
    #   (.4, .6]: 1/4 * |1 - .55| = 0.1125   -> ECE = 0.2625
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])

    # Execute
    ece = expected_calibration_error(probs, labels, bins=5)

    # Assert
    assert ece == pytest.approx(0.2625, abs=1e-12)


def test_ece_is_zero_for_confident_right_answers_and_the_gap_for_confident_wrong_ones() -> None:
    probs = np.eye(3)[[0, 1, 2, 0]]

    assert expected_calibration_error(probs, np.array([0, 1, 2, 0])) == 0.0
    assert expected_calibration_error(probs, np.array([1, 1, 2, 0])) == pytest.approx(0.25)
