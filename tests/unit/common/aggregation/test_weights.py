"""No reply can dominate: the declared sizes of the weighted rules are capped (common/aggregation/weights.py)."""

from __future__ import annotations

import numpy as np
import pytest

from common.aggregation import WEIGHTED_RULES, AggregationParams, aggregate, clip_weights
from common.errors import ConfigError

LIAR = float(2**52)
CLIP = AggregationParams(weight_clip=4.0)


def three_institutions() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Soft labels (5, 3) of three institutions, the third disagreeing with the others, and their class counts."""
    rng = np.random.default_rng(3)
    honest = [rng.dirichlet([8, 1, 1], size=5), rng.dirichlet([6, 2, 1], size=5)]
    liar = rng.dirichlet([1, 1, 8], size=5)
    counts = [np.array([40.0, 30, 30]), np.array([50.0, 20, 50]), np.array([30.0, 30, 40])]
    return [*honest, liar], counts


def test_an_honest_federation_is_not_changed_bit_for_bit() -> None:
    # Prepare
    labels, counts = three_institutions()
    sizes = [100, 120, 100]

    for rule in sorted(WEIGHTED_RULES):
        # Execute
        off = aggregate(rule, labels, sizes, counts, AggregationParams(weight_clip=0.0))
        on = aggregate(rule, labels, sizes, counts, CLIP)

        # Assert
        assert on.clipped == ()
        np.testing.assert_array_equal(on.probs, off.probs)


@pytest.mark.parametrize("rule", sorted(WEIGHTED_RULES))
def test_a_reply_declaring_2_to_the_52_is_clipped_to_the_multiple_of_the_lower_median(rule: str) -> None:
    # Prepare
    labels, counts = three_institutions()
    lying_counts = [counts[0], counts[1], counts[2] * (LIAR / counts[2].sum())]
    capped_counts = [counts[0], counts[1], counts[2] * (480.0 / counts[2].sum())]  # 4 x the lower median (120)

    # Execute
    unclipped = aggregate(rule, labels, [100, 120, int(LIAR)], lying_counts, AggregationParams(weight_clip=0.0))
    clipped = aggregate(rule, labels, [100, 120, int(LIAR)], lying_counts, CLIP)
    expected = aggregate(rule, labels, [100, 120, 480], capped_counts, AggregationParams(weight_clip=0.0))

    # Assert
    liar_argmax = labels[2].argmax(axis=1)
    assert (unclipped.probs.argmax(axis=1) == liar_argmax).all()  # without the clip the liar owns the ensemble
    assert [(c.index, c.declared, c.used, c.check) for c in clipped.clipped] == [(2, LIAR, 480.0, "weight-clip")]
    np.testing.assert_allclose(clipped.probs, expected.probs, atol=1e-6)


@pytest.mark.parametrize("rule", sorted(WEIGHTED_RULES))
def test_the_agreed_max_examples_gives_back_the_honest_ensemble(rule: str) -> None:
    # Prepare
    labels, counts = three_institutions()
    lying_counts = [counts[0], counts[1], counts[2] * (LIAR / counts[2].sum())]

    # Execute
    honest = aggregate(rule, labels, [100, 120, 100], counts, CLIP)
    capped = aggregate(rule, labels, [100, 120, int(LIAR)], lying_counts, CLIP, max_examples=[100, 120, 100])

    # Assert
    assert [(c.index, c.used, c.check) for c in capped.clipped] == [(2, 100.0, "weight-cap")]
    np.testing.assert_allclose(capped.probs, honest.probs, atol=1e-6)


def test_class_counts_are_scaled_by_their_institutions_factor_not_clipped_class_by_class() -> None:
    # Prepare: institution 0 is the only expert of class 2 (a per-class median would cut it to 0)
    sizes = np.array([100.0, 100.0, 1000.0])
    counts = np.array([[10.0, 10, 80], [50, 50, 0], [500, 500, 0]])

    # Execute
    used, used_counts, clipped = clip_weights(sizes, counts, 2.0)

    # Assert
    np.testing.assert_array_equal(used, [100.0, 100.0, 200.0])
    assert used_counts is not None
    np.testing.assert_array_equal(used_counts, [[10.0, 10, 80], [50, 50, 0], [100, 100, 0]])
    assert [(c.index, c.declared, c.used) for c in clipped] == [(2, 1000.0, 200.0)]


def test_the_mean_ignores_sizes_and_is_never_clipped() -> None:
    # Prepare
    labels, _ = three_institutions()

    # Execute
    result = aggregate("mean", labels, [100, 120, int(LIAR)], params=CLIP)

    # Assert
    assert result.clipped == ()
    np.testing.assert_allclose(result.probs, np.mean(labels, axis=0), atol=1e-6)


def test_a_zero_clip_turns_it_off_and_a_multiple_below_one_is_refused() -> None:
    # Prepare
    sizes = np.array([1.0, 1.0, LIAR])

    # Execute
    used, _, clipped = clip_weights(sizes, None, 0.0)

    # Assert
    assert used is sizes and clipped == ()
    with pytest.raises(ConfigError, match="weight-clip must be 0"):
        clip_weights(sizes, None, 0.5)
    with pytest.raises(ConfigError, match="weight_clip must be 0"):
        AggregationParams(weight_clip=0.5)
