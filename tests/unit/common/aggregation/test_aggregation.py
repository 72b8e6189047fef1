"""Unit tests of common/aggregation/: soft labels of many institutions -> one ensemble target."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.aggregation import NEEDS_CLASS_COUNTS, NEEDS_INDIVIDUAL_ROWS, RULES, Aggregate, AggregationParams, aggregate
from common.errors import ConfigError, MessageFormatError, QuorumError

ALL_RULES = sorted(RULES)


def rows(*values: list[float]) -> np.ndarray:
    """A `(n, C)` float32 soft-label matrix from its rows."""
    return np.array(values, dtype=np.float32)


def counts(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# --- the registry --------------------------------------------------------------------------------


def test_registry_names_every_rule() -> None:
    # Assert
    assert set(RULES) == {"mean", "weighted", "confidence", "era", "expertise", "balanced-expertise",
                          "inferred-expertise", "median", "trimmed-mean", "selective"}
    assert NEEDS_INDIVIDUAL_ROWS == frozenset(RULES) - {"mean", "weighted"}
    assert NEEDS_CLASS_COUNTS == {"expertise", "balanced-expertise"}


# --- mean (the tests of the former module, on `Aggregate`) ----------------------------------------


def test_mean_of_two_institutions() -> None:
    # Prepare
    first = rows([1.0, 0.0], [0.5, 0.5], [0.2, 0.8])
    second = rows([0.0, 1.0], [0.5, 0.5], [0.6, 0.4])

    # Execute
    result = aggregate("mean", [first, second], [100, 100])

    # Assert
    np.testing.assert_allclose(result.probs, [[0.5, 0.5], [0.5, 0.5], [0.4, 0.6]], atol=1e-7)
    np.testing.assert_array_equal(result.keep, [True, True, True])


def test_mean_of_three_institutions_golden_value() -> None:
    # Prepare
    soft_labels = [rows([0.6, 0.3, 0.1]), rows([0.0, 1.0, 0.0]), rows([0.3, 0.2, 0.5])]

    # Execute
    result = aggregate("mean", soft_labels, [1, 1, 1])

    # Assert
    np.testing.assert_allclose(result.probs, [[0.3, 0.5, 0.2]], atol=1e-7)


def test_mean_ignores_example_counts() -> None:
    # Prepare
    soft_labels = [rows([1.0, 0.0]), rows([0.0, 1.0])]

    # Execute
    balanced = aggregate("mean", soft_labels, [10, 10])
    skewed = aggregate("mean", soft_labels, [1, 10_000])

    # Assert
    np.testing.assert_array_equal(balanced.probs, skewed.probs)
    np.testing.assert_allclose(skewed.probs, [[0.5, 0.5]])


@pytest.mark.parametrize("rule", ALL_RULES)
def test_result_is_float32_of_the_input_shape(rule: str) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    soft_labels = [rng.dirichlet(np.ones(10), size=7).astype(np.float16) for _ in range(4)]
    class_counts = [rng.integers(0, 50, size=10) for _ in range(4)]

    # Execute
    result = aggregate(rule, soft_labels, [5, 6, 7, 8], class_counts)

    # Assert
    assert isinstance(result, Aggregate)
    assert result.probs.dtype == np.float32
    assert result.probs.shape == (7, 10)
    assert result.keep.dtype == np.bool_
    assert result.keep.shape == (7,)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-6)


def test_single_institution_is_returned_renormalised() -> None:
    # Prepare: a float16 row that sums to 1 only within the codec tolerance
    row = np.array([[0.3333, 0.3333, 0.3333]], dtype=np.float16)

    # Execute
    result = aggregate("mean", [row], [1])

    # Assert
    np.testing.assert_allclose(result.probs, [[1 / 3, 1 / 3, 1 / 3]], atol=1e-7)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_inputs_are_not_modified(rule: str) -> None:
    # Prepare
    first, second = rows([0.25, 0.75]), rows([0.75, 0.25])
    first_counts, second_counts = counts(3, 1), counts(0, 4)
    copies = [first.copy(), second.copy(), first_counts.copy(), second_counts.copy()]

    # Execute
    aggregate(rule, [first, second], [1, 1], [first_counts, second_counts])

    # Assert
    for array, copy in zip([first, second, first_counts, second_counts], copies, strict=True):
        np.testing.assert_array_equal(array, copy)


# --- every rule on hand-made inputs ----------------------------------------------------------------


@pytest.mark.parametrize("rule", ALL_RULES)
def test_symmetric_disagreement_is_a_tie(rule: str) -> None:
    # Prepare: two equally sized, equally expert institutions that mirror each other
    soft_labels = [rows([0.8, 0.2]), rows([0.2, 0.8])]

    # Execute
    result = aggregate(rule, soft_labels, [50, 50], [counts(25, 25), counts(25, 25)])

    # Assert: every rule is symmetric, so the tie stays a tie (selective keeps its only row)
    np.testing.assert_allclose(result.probs, [[0.5, 0.5]], atol=1e-7)
    np.testing.assert_array_equal(result.keep, [True])


# era sharpens; inferred-expertise divides out the class prior it infers from the rows themselves
@pytest.mark.parametrize("rule", sorted(set(RULES) - {"era", "inferred-expertise"}))
def test_a_single_institution_is_returned_as_is(rule: str) -> None:
    # Prepare
    only = rows([0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0])

    # Execute
    result = aggregate(rule, [only], [30], [counts(10, 10, 10)])

    # Assert
    np.testing.assert_allclose(result.probs, only, atol=1e-7)


def test_era_sharpens_a_single_institution() -> None:
    # Prepare
    only = rows([0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3])

    # Execute
    result = aggregate("era", [only], [30], params=AggregationParams(era_temperature=0.1))

    # Assert: softmax([7, 2, 1]) = [1, e^-5, e^-6] / (1 + e^-5 + e^-6); the uniform row stays uniform
    first = np.array([1.0, math.exp(-5), math.exp(-6)]) / (1 + math.exp(-5) + math.exp(-6))
    np.testing.assert_allclose(result.probs, [first, [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)


ONE_HOT, SOFT = [1.0, 0.0, 0.0], [0.2, 0.5, 0.3]
H_SOFT = -(0.2 * math.log(0.2) + 0.5 * math.log(0.5) + 0.3 * math.log(0.3))  # entropy of SOFT, nats
ONE_HOT_CASES = {
    "mean": [0.6, 0.25, 0.15],
    # weights 1/4 and 3/4: [0.25 + 0.15, 0.375, 0.225]
    "weighted": [0.4, 0.375, 0.225],
    # weights log 3 (one-hot) and log 3 - H(SOFT)
    "confidence": (math.log(3) * np.array(ONE_HOT) + (math.log(3) - H_SOFT) * np.array(SOFT))
    / (2 * math.log(3) - H_SOFT),
    # softmax([0.6, 0.25, 0.15] / 0.1) = [1, e^-3.5, e^-4.5] / sum
    "era": np.array([1.0, math.exp(-3.5), math.exp(-4.5)]) / (1 + math.exp(-3.5) + math.exp(-4.5)),
    # class 0 from the one-hot institution (its only class), classes 1 and 2 from the other: [1, 0.5, 0.3] / 1.8
    "expertise": np.array([1.0, 0.5, 0.3]) / 1.8,
    # institution 1's equal priors on classes 1 and 2 change nothing: [0.5, 0.3] / 0.8 -> [1, 0.625, 0.375] / 2
    "balanced-expertise": [0.5, 0.3125, 0.1875],
    # inferred counts [1, 0, 0] and [0.2, 0.5, 0.3]: institution 1's rows are its prior, so they become uniform;
    # class 0 weighs 1 / 1.2 and 0.2 / 1.2: [(1 + 0.2 / 3) / 1.2, 1 / 3, 1 / 3] = [8 / 9, 1 / 3, 1 / 3] -> / (14 / 9)
    "inferred-expertise": [4 / 7, 3 / 14, 3 / 14],
    "median": [0.6, 0.25, 0.15],  # the median of two values is their mean
    "trimmed-mean": [0.6, 0.25, 0.15],  # floor(0.1 * 2) = 0: nothing to trim
    "selective": [0.6, 0.25, 0.15],
}


@pytest.mark.parametrize("rule", ALL_RULES)
def test_an_institution_with_one_hot_rows(rule: str) -> None:
    # Prepare: institution 0 answers one-hot and only holds class 0; institution 1 holds classes 1 and 2
    soft_labels = [rows(ONE_HOT), rows(SOFT)]

    # Execute
    result = aggregate(rule, soft_labels, [10, 30], [counts(10, 0, 0), counts(0, 15, 15)])

    # Assert
    np.testing.assert_allclose(result.probs, [ONE_HOT_CASES[rule]], atol=1e-7)
    assert result.keep.all()


P = AggregationParams
GOLDEN = [
    # 0.75 * 0.8 + 0.25 * 0.2 = 0.65
    pytest.param("weighted", [[[0.8, 0.2]], [[0.2, 0.8]]], [300, 100], None, P(), [[0.65, 0.35]], None,
                 id="weighted-follows-the-larger-partition"),
    pytest.param("weighted", [[[0.8, 0.2]], [[0.4, 0.6]]], [0, 0], None, P(), [[0.6, 0.4]], None,
                 id="weighted-without-examples-is-the-mean"),
    # the uniform teacher weighs log 3 - log 3 = 0 (the mean would be [0.6167, 0.1917, 0.1917])
    pytest.param("confidence", [[[0.9, 0.05, 0.05]], [[1 / 3, 1 / 3, 1 / 3]]], [1, 1], None, P(),
                 [[0.9, 0.05, 0.05]], None, id="confidence-ignores-a-uniform-teacher"),
    # row 0: every weight is 0 -> the mean
    pytest.param("confidence", [[[0.25] * 4, [1, 0, 0, 0]], [[0.25] * 4, [0, 1, 0, 0]]], [1, 1], None, P(),
                 [[0.25] * 4, [0.5, 0.5, 0, 0]], None, id="confidence-of-uniform-teachers-is-the-mean"),
    # mean [2/3, 1/3] / 2 = [1/3, 1/6]; softmax -> [1, e^-1/6] / (1 + e^-1/6)
    pytest.param("era", [[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]], [1, 1, 1], None, P(era_temperature=2.0),
                 [np.array([1.0, math.exp(-1 / 6)]) / (1 + math.exp(-1 / 6))], None,
                 id="era-with-a-high-temperature-flattens"),
    # class 0: 0.9 * 0.7 + 0.1 * 0.4 = 0.67; class 1: 0.1 * 0.3 + 0.9 * 0.6 = 0.57; sum 1.24
    pytest.param("expertise", [[[0.7, 0.3]], [[0.4, 0.6]]], [10, 10], [[9, 1], [1, 9]], P(),
                 [np.array([0.67, 0.57]) / 1.24], None, id="expertise-trusts-each-on-its-own-classes"),
    # nobody holds class 2: [0.5 (expert 0), 0.5 (expert 1), 0.4 (equal weights)] / 1.4
    pytest.param("expertise", [[[0.5, 0.1, 0.4]], [[0.1, 0.5, 0.4]]], [4, 4], [[4, 0, 0], [0, 4, 0]], P(),
                 [np.array([0.5, 0.5, 0.4]) / 1.4], None, id="expertise-class-nobody-holds-equal-weights"),
    # each expert puts all its mass on the class it never saw: no mass left -> the mean
    pytest.param("expertise", [[[0.0, 1.0]], [[1.0, 0.0]]], [5, 5], [[5, 0], [0, 5]], P(),
                 [[0.5, 0.5]], None, id="expertise-row-without-mass-is-the-mean"),
    # institution 0 (prior [3/4, 1/4, 0]): [0.6 / 0.75, 0.3 / 0.25] = [0.8, 1.2] -> [0.4, 0.6, 0]; institution 1
    # holds only class 2 -> [0, 0, 1]; each class has one expert: [0.4, 0.6, 1] / 2
    pytest.param("balanced-expertise", [[[0.6, 0.3, 0.1]], [[0.2, 0.2, 0.6]]], [4, 4], [[3, 1, 0], [0, 0, 4]], P(),
                 [[0.2, 0.3, 0.5]], None, id="balanced-expertise-divides-out-each-prior"),
    # at T = 2 the prior enters as its square root: [0.6 / 0.75 ** 0.5, 0.3 / 0.25 ** 0.5] = [0.69282, 0.6]
    pytest.param("balanced-expertise", [[[0.6, 0.3, 0.1]], [[0.2, 0.2, 0.6]]], [4, 4], [[3, 1, 0], [0, 0, 4]],
                 P(temperature=2.0), [np.array([0.6 / 0.75 ** 0.5, 0.6, 0.6 / 0.75 ** 0.5 + 0.6]) / (2 * (0.6 / 0.75 ** 0.5 + 0.6))],
                 None, id="balanced-expertise-at-the-soft-label-temperature"),
    # institution 0 puts all its mass on class 1, which it never saw: uniform over what it holds (class 0)
    pytest.param("balanced-expertise", [[[0.0, 1.0]], [[0.0, 1.0]]], [5, 5], [[5, 0], [0, 5]], P(),
                 [[0.5, 0.5]], None, id="balanced-expertise-row-without-mass-on-held-classes"),
    # votes: institution 0 calls two of three samples class 0, institution 1 calls all three class 1; class 0
    # weighs 2 / 2 and 0 / 2, class 1 weighs 1 / 4 and 3 / 4: samples 0 and 1 get [1, 3 / 4] / (7 / 4), where the
    # mean would give [1 / 2, 1 / 2]. No counts are passed: each institution's come from its own rows.
    pytest.param("inferred-expertise", [[[1, 0], [1, 0], [0, 1]], [[0, 1], [0, 1], [0, 1]]], [10, 10], None, P(),
                 [[4 / 7, 3 / 7], [4 / 7, 3 / 7], [0, 1]], None, id="inferred-expertise-weighs-votes-by-what-each-calls"),
    # class 0: (0.3 + 0.5) / 2 = 0.4; class 1: (0.5 + 0.7) / 2 = 0.6
    pytest.param("median", [[[0.1, 0.9]], [[0.3, 0.7]], [[0.5, 0.5]], [[1.0, 0.0]]], [1] * 4, None, P(),
                 [[0.4, 0.6]], None, id="median-of-an-even-number-averages-the-middle-pair"),
    # floor(0.1 * 3) = 0: nothing to trim, the mean
    pytest.param("trimmed-mean", [[[0.6, 0.4]], [[0.0, 1.0]], [[0.9, 0.1]]], [1] * 3, None, P(trim_fraction=0.1),
                 [[0.5, 0.5]], None, id="trimmed-mean-of-too-few-is-the-mean"),
    # floor(0.25 * 4) = 1 cut at each end: class 0: mean(0.2, 0.6) = 0.4; class 1: mean(0.4, 0.8) = 0.6
    pytest.param("trimmed-mean", [[[0.1, 0.9]], [[0.2, 0.8]], [[0.6, 0.4]], [[1.0, 0.0]]], [1] * 4, None,
                 P(trim_fraction=0.25), [[0.4, 0.6]], None, id="trimmed-mean-cuts-each-end-per-coordinate"),
    # normalised entropies of the means: 1 (tie), about 0.47 ([0.9, 0.1]), 0 (one-hot)
    pytest.param("selective", [[[0.8, 0.2], [0.9, 0.1], [1, 0]], [[0.2, 0.8], [0.9, 0.1], [1, 0]]], [1, 1], None,
                 P(), [[0.5, 0.5], [0.9, 0.1], [1, 0]], [False, True, True], id="selective-drops-ambiguous-rows"),
    pytest.param("selective", [[[0.8, 0.2], [0.9, 0.1], [1, 0]], [[0.2, 0.8], [0.9, 0.1], [1, 0]]], [1, 1], None,
                 P(selective_threshold=0.3), [[0.5, 0.5], [0.9, 0.1], [1, 0]], [False, False, True],
                 id="selective-strict-threshold"),
    pytest.param("selective", [[[0.8, 0.2], [0.9, 0.1], [1, 0]], [[0.2, 0.8], [0.9, 0.1], [1, 0]]], [1, 1], None,
                 P(selective_threshold=1.0), [[0.5, 0.5], [0.9, 0.1], [1, 0]], [True, True, True],
                 id="selective-threshold-1-keeps-everything"),
    # entropies 1, H(0.6, 0.4) / log 2 ~ 0.97, 1: all above 0.5 -> keep the least ambiguous
    pytest.param("selective", [[[0.5, 0.5], [0.6, 0.4], [0.5, 0.5]]], [1], None, P(),
                 [[0.5, 0.5], [0.6, 0.4], [0.5, 0.5]], [False, True, False], id="selective-keeps-the-least-ambiguous"),
    pytest.param("selective", [[[0.5, 0.5], [0.5, 0.5]]], [1], None, P(), [[0.5, 0.5], [0.5, 0.5]], [True, True],
                 id="selective-keeps-every-tied-row"),
]


@pytest.mark.parametrize(("rule", "soft_labels", "num_examples", "class_counts", "params", "probs", "keep"), GOLDEN)
def test_golden_values(rule, soft_labels, num_examples, class_counts, params, probs, keep) -> None:
    # Prepare
    soft_labels = [np.array(s, dtype=np.float32) for s in soft_labels]
    class_counts = None if class_counts is None else [np.array(c, dtype=np.int64) for c in class_counts]

    # Execute
    result = aggregate(rule, soft_labels, num_examples, class_counts, params)

    # Assert
    np.testing.assert_allclose(result.probs, probs, atol=1e-6)
    np.testing.assert_array_equal(result.keep, [True] * len(probs) if keep is None else keep)


def test_inferred_expertise_is_balanced_expertise_on_the_counts_of_each_institutions_own_rows() -> None:
    # Prepare: soft rows at T = 3; institution 0 leans to class 0, institution 2 to class 2
    soft_labels = [rows([0.7, 0.2, 0.1], [0.5, 0.4, 0.1]), rows([0.3, 0.4, 0.3], [0.2, 0.5, 0.3]),
                   rows([0.1, 0.1, 0.8], [0.3, 0.1, 0.6])]
    inferred = [np.sum(s, axis=0, dtype=np.float64) for s in soft_labels]  # [1.2, 0.6, 0.2], [0.5, 0.9, 0.6], ...
    params = AggregationParams(temperature=3.0)

    # Execute: declared sizes and counts that would dominate any rule reading them
    result = aggregate("inferred-expertise", soft_labels, [1e12, 1, 1], [counts(10**9, 0, 0)] * 3, params)

    # Assert
    expected = aggregate("balanced-expertise", soft_labels, [1, 1, 1], inferred, params)
    np.testing.assert_allclose(result.probs, expected.probs, atol=1e-7)
    assert not np.allclose(result.probs, aggregate("mean", soft_labels, [1, 1, 1]).probs, atol=1e-2)
    assert result.clipped == ()  # it weighs no declared size, so nothing is capped


@pytest.mark.parametrize(("rule", "soft_labels", "class_counts", "temperature"), [
    # an inferred count of 2e-309: its prior's power 1 / 2e-309 overflows a float64
    ("inferred-expertise", [np.array([[2.2250738585072014e-309, 1.0]])], None, 1.0),
    # a prior of 1e-6 at T = 0.001: 1e6000
    ("balanced-expertise", [np.array([[0.5, 0.5]])], [counts(1, 999_999)], 0.001),
], ids=["subnormal-inferred-count", "low-temperature"])
def test_prior_correction_of_extreme_priors_stays_on_the_simplex(rule: str, soft_labels, class_counts, temperature: float) -> None:
    # Execute
    result = aggregate(rule, soft_labels, [1], class_counts, AggregationParams(temperature=temperature))

    # Assert: in logs, q / pi^(1/T) is [1, 1] for the first and all on the rare class for the second
    np.testing.assert_allclose(result.probs, [[0.5, 0.5]] if rule == "inferred-expertise" else [[1.0, 0.0]], atol=1e-7)


def test_a_peer_calling_every_sample_one_class_weighs_on_that_class_what_its_rows_imply_and_nothing_elsewhere() -> None:
    # Prepare: 100 samples, 10 per class; nine honest institutions put 0.91 on the true class and 0.01 on each other;
    # the liar calls every sample class 9
    truth = np.repeat(np.arange(10), 10)
    honest = np.full((100, 10), 0.01, dtype=np.float32)
    honest[np.arange(100), truth] = 0.91
    liar = np.zeros((100, 10), dtype=np.float32)
    liar[:, 9] = 1.0

    # Execute
    result = aggregate("inferred-expertise", [honest] * 9 + [liar], [1] * 10)

    # Assert: its weight on class 9 is n / (n + the others' inferred counts) = 100 / (100 + 9 * 10) = 10 / 19, and it
    # has none on the classes it never calls: a class 0 sample keeps class 0, with 0.91 against 10/19 + 9/19 * 0.01
    on_nine = 10 / 19 + 9 / 19 * 0.01
    np.testing.assert_allclose(result.probs[0, [0, 1, 9]], np.array([0.91, 0.01, on_nine]) / (0.91 + 8 * 0.01 + on_nine),
                               atol=1e-6)
    assert (result.probs.argmax(axis=1) == truth).all()
    # the plain mean gives the liar a tenth of each row: 0.1 + 0.009 on class 9
    np.testing.assert_allclose(aggregate("mean", [honest] * 9 + [liar], [1] * 10).probs[0, 9], 0.109, atol=1e-6)


HONEST = [[0.91] + [0.01] * 9, [0.82] + [0.02] * 9, [0.73] + [0.03] * 9, [0.64] + [0.04] * 9]
ADVERSARY = [0.0] * 9 + [1.0]


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_resist_an_outlier(rule: str) -> None:
    # Prepare: four honest institutions near class 0, one adversary all on class 9
    soft_labels = [rows(r) for r in HONEST] + [rows(ADVERSARY)]
    params = AggregationParams(trim_fraction=0.2)  # floor(0.2 * 5) = 1 cut at each end

    # Execute
    robust = aggregate(rule, soft_labels, [1] * 5, params=params)
    mean = aggregate("mean", soft_labels, [1] * 5)

    # Assert: both robust rules give class 0: 0.73, classes 1-8: 0.02, class 9: 0.03 (sum 0.92)
    np.testing.assert_allclose(robust.probs, [np.array([0.73] + [0.02] * 8 + [0.03]) / 0.92], atol=1e-7)
    # the mean moves: class 0: 3.1 / 5 = 0.62, class 9: (0.1 + 1) / 5 = 0.22
    np.testing.assert_allclose(mean.probs, [[0.62] + [0.02] * 8 + [0.22]], atol=1e-7)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_no_majority_on_any_class_falls_back_to_the_mean(rule: str) -> None:
    # Prepare: three one-hot rows on three different classes; every coordinate's median is 0
    soft_labels = [rows([1.0, 0.0, 0.0, 0.0]), rows([0.0, 1.0, 0.0, 0.0]), rows([0.0, 0.0, 1.0, 0.0])]

    # Execute
    result = aggregate(rule, soft_labels, [1] * 3, params=AggregationParams(trim_fraction=0.4))

    # Assert
    np.testing.assert_allclose(result.probs, [[1 / 3, 1 / 3, 1 / 3, 0.0]], atol=1e-7)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("soft_labels", [[np.full((1, 2), 0.5)], []], ids=["with-labels", "empty"])
def test_unknown_rule_is_a_config_error(soft_labels) -> None:
    # Execute / Assert
    known = ("balanced-expertise, confidence, era, expertise, inferred-expertise, mean, median, selective, trimmed-mean, "
             "weighted")
    with pytest.raises(ConfigError, match=f"unknown aggregation 'krum'; known rules: {known}"):
        aggregate("krum", soft_labels, [1] * len(soft_labels))


def test_no_soft_labels_is_a_quorum_error() -> None:
    # Execute / Assert
    with pytest.raises(QuorumError, match="no soft labels to aggregate: every reply was rejected or missing"):
        aggregate("mean", [], [])


def test_soft_labels_of_different_shapes_are_refused() -> None:
    # Prepare
    soft_labels = [np.full((2, 2), 0.5), np.full((3, 2), 0.5)]

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=r"soft labels differ in shape: \[\(2, 2\), \(3, 2\)\]"):
        aggregate("mean", soft_labels, [1, 1])


@pytest.mark.parametrize(
    "bad", [np.full((2,), 0.5), np.zeros((0, 2)), np.array([[0.5, np.nan]]), np.array([[1.5, -0.5]]),
            np.array([[0.0, 0.0]])],
    ids=["1-d", "no-rows", "nan", "negative", "no-mass"],
)
def test_soft_labels_that_are_not_probabilities_are_refused(bad: np.ndarray) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match="soft labels"):
        aggregate("mean", [bad], [1])


@pytest.mark.parametrize("num_examples", [[1], [1, 2, 3], [1, -1]], ids=["too-few", "too-many", "negative"])
def test_bad_num_examples_are_refused(num_examples: list[int]) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match="num_examples"):
        aggregate("weighted", [rows([0.5, 0.5]), rows([0.5, 0.5])], num_examples)


@pytest.mark.parametrize("rule", sorted(NEEDS_CLASS_COUNTS))
def test_rules_on_class_counts_without_them_are_a_config_error(rule: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"aggregation '{rule}' needs every institution's class counts"):
        aggregate(rule, [rows([0.5, 0.5])], [1])


@pytest.mark.parametrize(
    ("class_counts", "message"),
    [
        ([counts(1, 2)], r"expected one array per institution \(2\), got 1"),
        ([counts(1, 2), counts(1, 2, 3)], r"institution 1: expected shape \(2,\), got \(3,\)"),
        ([counts(1, 2), np.array([[1, 2]])], r"institution 1: expected shape \(2,\), got \(1, 2\)"),
        ([counts(-1, 2), counts(1, 2)], r"institutions \[0\]: counts must be finite and >= 0"),
    ],
    ids=["too-few", "wrong-length", "wrong-rank", "negative"],
)
def test_bad_class_counts_are_refused(class_counts: list[np.ndarray], message: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        aggregate("expertise", [rows([0.5, 0.5]), rows([0.5, 0.5])], [3, 3], class_counts)


@pytest.mark.parametrize(
    ("field", "value"),
    [("era_temperature", 0.0), ("era_temperature", -1.0), ("era_temperature", math.nan),
     ("era_temperature", math.inf), ("trim_fraction", 0.5), ("trim_fraction", -0.1),
     ("selective_threshold", 0.0), ("selective_threshold", 1.5), ("selective_threshold", "0.5"),
     ("trim_fraction", True)],
)
def test_params_out_of_range_are_a_config_error(field: str, value: object) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"aggregation params: {field} must be"):
        AggregationParams(**{field: value})


def test_params_report_every_problem_at_once() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="era_temperature.*trim_fraction.*selective_threshold"):
        AggregationParams(era_temperature=0, trim_fraction=0.7, selective_threshold=2)


def test_params_that_are_not_aggregation_params_are_a_config_error() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="must be an AggregationParams, got dict"):
        aggregate("era", [rows([0.5, 0.5])], [1], params={"era_temperature": 0.1})  # type: ignore[arg-type]


# --- properties ----------------------------------------------------------------------------------


@st.composite
def rounds(draw) -> tuple[list[np.ndarray], list[int], list[np.ndarray], AggregationParams]:
    """k institutions' `(n, C)` rows on the simplex in a wire-like dtype, with sizes, class counts and params."""
    k = draw(st.integers(1, 6))
    n = draw(st.integers(1, 8))
    c = draw(st.integers(2, 6))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    weights = draw(hnp.arrays(np.float64, (k, n, c), elements=st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)))
    empty = weights.sum(axis=2) == 0
    weights[empty, 0] = 1.0  # an all-zero row becomes one-hot
    probs = weights / weights.sum(axis=2, keepdims=True)
    class_counts = draw(hnp.arrays(np.int64, (k, c), elements=st.integers(0, 20)))
    num_examples = draw(st.lists(st.integers(0, 1000), min_size=k, max_size=k))
    params = AggregationParams(
        era_temperature=draw(st.floats(0.01, 10.0)),
        trim_fraction=draw(st.floats(0.0, 0.499)),
        selective_threshold=draw(st.floats(0.01, 1.0)),
    )
    return [probs[j].astype(dtype) for j in range(k)], num_examples, list(class_counts), params


@pytest.mark.parametrize("rule", ALL_RULES)
@settings(max_examples=30, deadline=None)
@given(case=rounds())
def test_any_round_aggregates_to_the_simplex(rule: str, case) -> None:
    # Prepare
    soft_labels, num_examples, class_counts, params = case

    # Execute
    result = aggregate(rule, soft_labels, num_examples, class_counts, params)

    # Assert
    n = soft_labels[0].shape[0]
    assert result.probs.dtype == np.float32
    assert result.probs.shape == soft_labels[0].shape
    assert np.isfinite(result.probs).all()
    assert (result.probs >= 0).all()
    np.testing.assert_allclose(result.probs.sum(axis=1, dtype=np.float64), 1.0, atol=1e-5)
    assert result.keep.dtype == np.bool_
    assert result.keep.shape == (n,)
    assert result.keep.any()


@pytest.mark.parametrize("rule", ALL_RULES)
@settings(max_examples=20, deadline=None)
@given(case=rounds(), seed=st.integers(0, 2**16))
def test_the_order_of_institutions_does_not_matter(rule: str, case, seed: int) -> None:
    # Prepare
    soft_labels, num_examples, class_counts, params = case
    order = np.random.default_rng(seed).permutation(len(soft_labels))

    # Execute
    forward = aggregate(rule, soft_labels, num_examples, class_counts, params)
    shuffled = aggregate(rule, [soft_labels[j] for j in order], [num_examples[j] for j in order],
                         [class_counts[j] for j in order], params)

    # Assert
    np.testing.assert_allclose(forward.probs, shuffled.probs, atol=1e-6)
    np.testing.assert_array_equal(forward.keep, shuffled.keep)


@settings(max_examples=40, deadline=None)
@given(case=rounds())
def test_mean_is_the_renormalised_average(case) -> None:
    # Prepare
    soft_labels, num_examples, _, _ = case

    # Execute
    result = aggregate("mean", soft_labels, num_examples)

    # Assert
    stacked = [s.astype(np.float64) / s.astype(np.float64).sum(axis=1, keepdims=True) for s in soft_labels]
    np.testing.assert_allclose(result.probs, np.mean(stacked, axis=0), atol=1e-6)


def test_selective_judges_ambiguity_at_temperature_one() -> None:
    # Prepare: one teacher's softmax(z / T) at T = 4 for two confident rows (logits 8,0 and 6,0) and
    # an ambiguous one (1,0); softened, all three rows have normalised entropy above 0.5
    logits = np.array([[8.0, 0.0], [6.0, 0.0], [1.0, 0.0]])
    soft = np.exp(logits / 4) / np.exp(logits / 4).sum(axis=1, keepdims=True)

    # Execute
    judged_soft = aggregate("selective", [soft], [1], params=AggregationParams(selective_threshold=0.5))
    judged_t1 = aggregate("selective", [soft], [1], params=AggregationParams(selective_threshold=0.5, temperature=4.0))

    # Assert: judged on the softened rows none passes and only the least ambiguous is kept; at T = 1
    # (softmax(8, 0) and softmax(6, 0) have normalised entropies 0.005 and 0.025) both confident rows
    # pass; the student still gets the softened rows
    assert judged_soft.keep.tolist() == [True, False, False]
    assert judged_t1.keep.tolist() == [True, True, False]
    np.testing.assert_allclose(judged_t1.probs, soft, atol=1e-6)
