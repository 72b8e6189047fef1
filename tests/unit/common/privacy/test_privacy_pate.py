"""Unit tests of common/privacy/pate.py: shards, vote histograms, and the GNMax noise actually applied."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from common.errors import ConfigError
from common.privacy import accounting, pate

# --- shards -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "num_shards"), [(10, 2), (101, 7), (50, 50)])
def test_shards_are_disjoint_and_cover(n: int, num_shards: int) -> None:
    # Execute
    shards = pate.shard_indices(n, num_shards, seed=3)

    # Assert
    assert len(shards) == num_shards
    joined = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # covering, and no index twice
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(shard.dtype == np.int64 for shard in shards)


def test_shards_are_seeded() -> None:
    # Execute
    first = pate.shard_indices(100, 4, seed=1)
    again = pate.shard_indices(100, 4, seed=1)
    other = pate.shard_indices(100, 4, seed=2)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert not np.array_equal(first[0], np.arange(25))  # shuffled, not contiguous


@pytest.mark.parametrize(
    ("n", "num_shards", "names"),
    [
        (10, 1, r"num_shards must be >= 2 \(one sub-teacher per shard\), got 1"),
        (3, 5, "3 private samples cannot fill 5 shards"),
        (10.0, 2, "n must be an integer, got 10.0"),
    ],
)
def test_bad_shards_are_refused(n: int, num_shards: int, names: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=names):
        pate.shard_indices(n, num_shards, seed=0)


# --- vote histograms ------------------------------------------------------------------------------------


def test_vote_histograms_by_hand() -> None:
    # Prepare: 3 sub-teachers, 4 public samples, 3 classes
    predictions = np.array([[0, 1, 2, 2], [0, 2, 2, 1], [1, 2, 2, 0]])

    # Execute
    votes = pate.vote_histograms(predictions, num_classes=3)

    # Assert
    np.testing.assert_array_equal(votes, [[2, 1, 0], [0, 1, 2], [0, 0, 3], [1, 1, 1]])
    assert votes.dtype == np.int64


@pytest.mark.parametrize(
    ("predictions", "names"),
    [
        (np.array([[0, 3]]), r"class ids must lie in \[0, 3\), got range \[0, 3\]"),
        (np.array([[0, -1]]), "class ids must lie in"),
        (np.array([0, 1]), "predictions must be an integer array"),
        (np.array([[0.0, 1.0]]), "predictions must be an integer array"),
    ],
)
def test_bad_predictions_are_refused(predictions: np.ndarray, names: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=names):
        pate.vote_histograms(predictions, num_classes=3)


# --- the noise actually applied -----------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1.0, 5.0, 20.0])
def test_noise_scale_matches_sigma(sigma: float) -> None:
    # Prepare: 20,000 x 10 = 200,000 noise draws
    votes = np.random.default_rng(0).integers(0, 50, size=(20_000, 10))

    # Execute
    residual = (pate.noisy_votes(votes, sigma, np.random.default_rng(1)) - votes).ravel()

    # Assert: (n-1) s^2 / sigma^2 ~ chi2(n-1) and mean ~ N(0, sigma^2 / n), each at a 1e-6 false-alarm rate;
    # at this n the variance band is about +-1.5%, so a 5% error in the applied scale is caught
    n = residual.size
    low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], df=n - 1)
    statistic = (n - 1) * residual.var(ddof=1) / sigma**2
    assert low < statistic < high
    assert not low < (n - 1) * residual.var(ddof=1) / (1.05 * sigma) ** 2 < high
    assert abs(residual.mean()) < stats.norm.ppf(1 - 0.5e-6) * sigma / math.sqrt(n)


def test_noise_is_independent_across_classes() -> None:
    # Prepare
    votes = np.zeros((50_000, 2), dtype=np.int64)

    # Execute
    noise = pate.noisy_votes(votes, 3.0, np.random.default_rng(2))

    # Assert: sample correlation ~ N(0, 1/n); 5/sqrt(n) is a 5-sigma band
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 5 / math.sqrt(len(noise))


def test_soft_labels_use_noisy_votes() -> None:
    # Prepare: counts so large that clipping never bites, so soft * total recovers the noisy counts
    votes = np.full((5_000, 4), 1_000, dtype=np.int64)

    # Execute
    soft = pate.gnmax_soft_labels(votes, 10.0, np.random.default_rng(3))
    noisy = pate.noisy_votes(votes, 10.0, np.random.default_rng(3))

    # Assert
    expected = noisy / noisy.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(soft, expected, atol=1e-6)


# --- soft labels ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    votes=hnp.arrays(
        np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=12), elements=st.integers(0, 60)
    ),
    sigma=st.floats(0.01, 200.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_soft_labels_lie_on_the_simplex(votes: np.ndarray, sigma: float, seed: int) -> None:
    # Execute
    soft = pate.gnmax_soft_labels(votes, sigma, np.random.default_rng(seed))

    # Assert
    assert soft.shape == votes.shape and soft.dtype == np.float32
    assert np.all(soft >= 0)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)


def test_row_without_positive_entry_becomes_uniform() -> None:
    # Prepare: zero votes and a tiny sigma, with a generator whose draws are all negative
    class Negative(np.random.Generator):
        def normal(self, loc=0.0, scale=1.0, size=None):  # type: ignore[override]
            return -np.abs(super().normal(loc, scale, size)) - 1e-3

    votes = np.array([[0, 0, 0, 0], [5, 0, 0, 0]], dtype=np.int64)

    # Execute
    soft = pate.gnmax_soft_labels(votes, 0.1, Negative(np.random.PCG64(0)))

    # Assert
    np.testing.assert_allclose(soft[0], [0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(soft[1], [1.0, 0.0, 0.0, 0.0])


def test_bad_noise_arguments_are_refused() -> None:
    # Prepare
    votes = np.array([[1, 2]], dtype=np.int64)
    rng = np.random.default_rng(0)

    # Execute / Assert
    with pytest.raises(ConfigError, match="sigma must be a finite number > 0, got 0.0"):
        pate.gnmax_soft_labels(votes, 0.0, rng)
    with pytest.raises(ConfigError, match="rng must be a numpy.random.Generator, got RandomState"):
        pate.gnmax_soft_labels(votes, 1.0, np.random.RandomState(0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="votes must be integer counts"):
        pate.gnmax_soft_labels(votes.astype(np.float32), 1.0, rng)
    with pytest.raises(ConfigError, match="vote counts must be >= 0"):
        pate.gnmax_soft_labels(-votes, 1.0, rng)


# --- accounting -----------------------------------------------------------------------------------------


def test_gnmax_event_is_the_history_entry() -> None:
    # Execute
    event = pate.gnmax_event(25.0, 1000)

    # Assert
    assert event == {"mechanism": "gnmax", "sigma": 25.0, "l2_sensitivity": math.sqrt(2), "queries": 1000}
    assert pate.L2_SENSITIVITY == math.sqrt(2)
    assert accounting.epsilon([event], 1e-5) > 0


def test_gnmax_event_rejects_bad_counts() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="queries must be an integer >= 1, got 0"):
        pate.gnmax_event(25.0, 0)


def test_the_os_entropy_generator_is_fresh_each_time() -> None:
    # Execute
    draws = [pate.os_entropy_rng().integers(0, 2**63, size=4) for _ in range(2)]

    # Assert: two generators from 128 bits of OS entropy each (equal draws: a 2^-252 chance)
    assert isinstance(pate.os_entropy_rng(), np.random.Generator)
    assert not np.array_equal(draws[0], draws[1])
