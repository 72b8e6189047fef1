"""Unit tests of common/aggregation/streaming.py: one reply folded at a time gives the batch rule's target, and the
linear rules' state does not grow with the number of institutions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.aggregation import RULES, WEIGHTED_RULES, AggregationParams, HeldRows, RunningSum, aggregate, running_aggregate
from common.aggregation.streaming import SUMMED
from common.errors import ConfigError, MessageFormatError, QuorumError

ALL_RULES = sorted(RULES)
K, N, C = 9, 40, 5


def institutions(k: int = K, n: int = N, seed: int = 0) -> tuple[list[np.ndarray], list[int], list[np.ndarray]]:
    """k institutions' float32 rows `(n, C)` (one of them exactly uniform on sample 0, one with float16-like drift),
    their sizes and their class counts (class 0 held by nobody, so expertise falls back on the mean there)."""
    rng = np.random.default_rng(seed)
    rows = [rng.dirichlet(np.full(C, 0.4), size=n).astype(np.float32) for _ in range(k)]
    rows[1][0] = 1.0 / C
    rows[2] *= np.float32(1.001)
    counts = [rng.integers(0, 40, size=C) for _ in range(k)]
    for held in counts:
        held[0] = 0
    return rows, [int(c.sum()) + 1 for c in counts], counts


def folded(rule: str, rows: list[np.ndarray], sizes: list[int], counts: list[np.ndarray] | None = None,
           params: AggregationParams | None = None, caps: list[float] | None = None) -> RunningSum | HeldRows:
    running = running_aggregate(rule, params or AggregationParams())
    for j, q in enumerate(rows):
        running.fold(q, sizes[j], None if counts is None else counts[j], math.inf if caps is None else caps[j])
    assert isinstance(running, (RunningSum, HeldRows))
    return running


def batch_mean(rows: list[np.ndarray]) -> np.ndarray:
    """The batch rule's mean before its float32 cast: every row renormalised in float64, then averaged."""
    stack = np.stack([np.asarray(q, dtype=np.float64) for q in rows])
    return (stack / stack.sum(axis=2, keepdims=True)).mean(axis=0)


def test_the_streamed_mean_is_the_batch_mean_to_1e_12() -> None:
    # Prepare
    rows, sizes, _ = institutions()

    # Execute
    running = folded("mean", rows, sizes)

    # Assert
    assert isinstance(running, RunningSum) and running.total is not None
    np.testing.assert_allclose(running.total / running.count, batch_mean(rows), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(running.result().probs, aggregate("mean", rows, sizes).probs)


def test_the_streamed_weighted_mean_is_the_batch_one_to_1e_12() -> None:
    # Prepare
    rows, sizes, _ = institutions()
    stack = np.stack([np.asarray(q, dtype=np.float64) for q in rows])
    stack /= stack.sum(axis=2, keepdims=True)
    expected = np.tensordot(np.asarray(sizes, dtype=np.float64) / sum(sizes), stack, axes=1)

    # Execute
    running = folded("weighted", rows, sizes, params=AggregationParams(weight_clip=0.0))

    # Assert
    assert isinstance(running, RunningSum) and running.total is not None and running.weight is not None
    np.testing.assert_allclose(running.total / running.weight, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(running.result().probs, aggregate("weighted", rows, sizes).probs, rtol=0, atol=1e-7)


@pytest.mark.parametrize("weight_clip", [0.0, 4.0])
@pytest.mark.parametrize("rule", ALL_RULES)
def test_every_rule_streamed_gives_the_batch_target(rule: str, weight_clip: float) -> None:
    # Prepare: node 3 agreed at most 5 examples, so the weighted rules cap it
    rows, sizes, counts = institutions()
    params = AggregationParams(temperature=2.0, weight_clip=weight_clip)
    caps = [math.inf] * K
    caps[3] = 5.0
    expected = aggregate(rule, rows, sizes, counts, params, caps)

    # Execute
    result = folded(rule, rows, sizes, counts, params, caps).result()

    # Assert
    np.testing.assert_allclose(result.probs, expected.probs, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(result.keep, expected.keep)
    assert result.clipped == expected.clipped
    assert bool(result.clipped) == (rule in WEIGHTED_RULES)


def test_a_linear_rule_holds_one_n_by_c_array_whatever_the_number_of_institutions() -> None:
    # Prepare: 200 institutions answering the same 1,000 public samples
    rows, sizes, _ = institutions(k=200, n=1000)

    # Execute
    after_ten = folded("mean", rows[:10], sizes[:10])
    after_all = folded("mean", rows, sizes)

    # Assert: one (n, C) float64 sum, a scalar weight, no list of rows
    for running in (after_ten, after_all):
        state = vars(running)
        arrays = [value for value in state.values() if isinstance(value, np.ndarray)]
        assert [a.shape for a in arrays if a.ndim > 0] == [(1000, C)]
        assert all(a.size == 1 for a in arrays if a.ndim == 0)
        assert not [value for value in state.values() if isinstance(value, list) and value]
    assert after_all.count == 200
    assert sum(a.nbytes for a in vars(after_all).values() if isinstance(a, np.ndarray)) == \
        sum(a.nbytes for a in vars(after_ten).values() if isinstance(a, np.ndarray))


@pytest.mark.parametrize("rule", sorted(SUMMED))
def test_every_summed_rule_keeps_at_most_two_n_by_c_arrays(rule: str) -> None:
    # Prepare
    rows, sizes, counts = institutions(k=60)

    # Execute
    running = folded(rule, rows, sizes, counts, AggregationParams(weight_clip=0.0))

    # Assert
    assert isinstance(running, RunningSum)
    arrays = [value for value in vars(running).values() if isinstance(value, np.ndarray)]
    assert len([a for a in arrays if a.shape == (N, C)]) <= 2 and all(a.size <= N * C for a in arrays)


def test_rules_that_need_every_row_hold_them_and_say_so() -> None:
    # Prepare
    rows, sizes, _ = institutions()

    # Execute
    median = folded("median", rows, sizes)
    clipped = running_aggregate("weighted", AggregationParams(weight_clip=4.0))

    # Assert: order statistics and the median clip need every reply; ERA and selective need only the mean
    assert isinstance(median, HeldRows) and len(median.rows) == K
    assert isinstance(clipped, HeldRows)
    assert {rule for rule in ALL_RULES if isinstance(running_aggregate(rule, AggregationParams(weight_clip=0.0)),
                                                     HeldRows)} == {"median", "trimmed-mean"}


def test_a_refused_reply_leaves_the_running_aggregate_as_it_was() -> None:
    # Prepare
    rows, sizes, _ = institutions(k=3)
    running = folded("mean", rows[:2], sizes[:2])
    assert isinstance(running, RunningSum) and running.total is not None
    before = running.total.copy()
    broken = rows[2].copy()
    broken[4, 1] = np.nan

    # Execute
    with pytest.raises(MessageFormatError, match="1 rows hold NaN"):
        running.fold(broken, sizes[2])
    with pytest.raises(MessageFormatError, match=r"differ in shape: \(40, 4\), the replies before had \(40, 5\)"):
        running.fold(rows[2][:, :4], sizes[2])

    # Assert
    assert running.count == 2
    np.testing.assert_array_equal(running.total, before)


def test_expertise_without_class_counts_is_refused_before_anything_is_folded() -> None:
    # Prepare
    rows, sizes, _ = institutions(k=3)
    running = running_aggregate("expertise", AggregationParams(weight_clip=0.0))

    # Execute / Assert
    with pytest.raises(ConfigError, match="needs every institution's class counts"):
        running.fold(rows[0], sizes[0])
    assert running.count == 0


def test_nothing_folded_is_no_quorum() -> None:
    # Execute / Assert
    with pytest.raises(QuorumError, match="no soft labels to aggregate"):
        running_aggregate("mean").result()


def test_a_weighted_mean_whose_every_weight_is_zero_is_the_plain_mean() -> None:
    # Prepare: every institution agreed 0 examples
    rows, sizes, _ = institutions(k=4)

    # Execute
    result = folded("weighted", rows, sizes, params=AggregationParams(weight_clip=0.0), caps=[0.0] * 4).result()

    # Assert
    np.testing.assert_allclose(result.probs, aggregate("mean", rows, sizes).probs, rtol=0, atol=1e-7)
    assert [clip.index for clip in result.clipped] == [0, 1, 2, 3]
