"""Unit tests of common/tasks/partition.py: each institution's share of the private pool."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import common.tasks.partition as partition_module
from common.errors import ConfigError, DataError
from common.tasks.partition import partition_indices

NUM_PARTITIONS = 5


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """A private pool of 1,000 labels over 10 classes."""
    return np.random.default_rng(0).integers(0, 10, size=1000)


def all_partitions(labels: np.ndarray, partitioner: str, **kwargs) -> list[np.ndarray]:
    with warnings.catch_warnings():  # the pathological partitioner warns about unused classes
        warnings.simplefilter("ignore", UserWarning)
        return [
            partition_indices(labels, NUM_PARTITIONS, pid, partitioner, **kwargs) for pid in range(NUM_PARTITIONS)
        ]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_pool(labels: np.ndarray, partitioner: str) -> None:
    # Execute
    parts = all_partitions(labels, partitioner)

    # Assert
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())), "partitions overlap"
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partition_is_sorted_int64_indices(labels: np.ndarray, partitioner: str) -> None:
    # Execute
    parts = all_partitions(labels, partitioner)

    # Assert
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)
        assert part.min() >= 0 and part.max() < len(labels)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitioning_is_deterministic(labels: np.ndarray, partitioner: str) -> None:
    # Execute
    first = all_partitions(labels, partitioner, seed=11)
    again = all_partitions(labels, partitioner, seed=11)

    # Assert
    for one, other in zip(first, again, strict=True):
        np.testing.assert_array_equal(one, other)


def test_dirichlet_partition_depends_on_the_seed(labels: np.ndarray) -> None:
    # Execute
    first = partition_indices(labels, NUM_PARTITIONS, 0, "dirichlet", seed=1)
    other = partition_indices(labels, NUM_PARTITIONS, 0, "dirichlet", seed=2)

    # Assert
    assert not np.array_equal(first, other)


def test_iid_takes_balanced_contiguous_shards(labels: np.ndarray) -> None:
    # Execute
    parts = all_partitions(labels, "iid")

    # Assert
    assert [len(p) for p in parts] == [200] * NUM_PARTITIONS
    for pid, part in enumerate(parts):
        np.testing.assert_array_equal(part, np.arange(200 * pid, 200 * (pid + 1)))


def test_dirichlet_respects_min_partition_size(labels: np.ndarray) -> None:
    # Execute
    parts = all_partitions(labels, "dirichlet", alpha=0.3, min_partition_size=40)

    # Assert
    assert min(len(p) for p in parts) >= 40


@pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")
def test_dirichlet_with_impossible_min_size_is_a_data_error(labels: np.ndarray) -> None:
    # Prepare: 1,000 samples cannot give 5 partitions of at least 300 each
    min_size = 300

    # Execute / Assert
    with pytest.raises(DataError, match="dirichlet partitioning of 1000 samples into 5 parts failed: .*lower min-partition-size"):
        partition_indices(labels, NUM_PARTITIONS, 0, "dirichlet", min_partition_size=min_size)


@pytest.mark.parametrize("classes_per_client", [1, 2, 3])
def test_pathological_gives_at_most_classes_per_client_classes(
    labels: np.ndarray, classes_per_client: int
) -> None:
    # Execute
    parts = all_partitions(labels, "pathological", classes_per_client=classes_per_client)

    # Assert
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())), "partitions overlap"
    for part in parts:
        assert 1 <= len(np.unique(labels[part])) <= classes_per_client


@pytest.mark.parametrize("partition_id", [-1, NUM_PARTITIONS, 100])
def test_partition_id_out_of_range_is_a_config_error(labels: np.ndarray, partition_id: int) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"partition-id {partition_id} is outside \[0, {NUM_PARTITIONS}\)"):
        partition_indices(labels, NUM_PARTITIONS, partition_id, "iid")


def test_unknown_partitioner_is_a_config_error(labels: np.ndarray) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown partitioner 'shards'; use iid, dirichlet, pathological or natural"):
        partition_indices(labels, NUM_PARTITIONS, 0, "shards")


@settings(max_examples=15, deadline=None)
@given(size=st.integers(min_value=8, max_value=300), num_partitions=st.integers(min_value=1, max_value=8))
def test_iid_partitions_of_any_pool_are_disjoint_and_cover_it(size: int, num_partitions: int) -> None:
    # Prepare
    pool = np.random.default_rng(size).integers(0, 10, size=size)

    # Execute
    parts = [partition_indices(pool, num_partitions, pid, "iid") for pid in range(num_partitions)]

    # Assert
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(size))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_one_process_partitions_the_pool_once_for_every_node(labels: np.ndarray, partitioner: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the partitions as each node computed them alone, then a counter of partitioners built
    partition_module._partitioned.cache_clear()
    alone = []
    for pid in range(NUM_PARTITIONS):
        partition_module._partitioned.cache_clear()
        alone.append(all_partitions(labels, partitioner, seed=5)[pid])
    partition_module._partitioned.cache_clear()
    built: list[str] = []
    build = partition_module._build
    monkeypatch.setattr(partition_module, "_build", lambda name, *rest: built.append(name) or build(name, *rest))

    # Execute: one simulation worker serving every node in turn
    shared = all_partitions(labels, partitioner, seed=5)

    # Assert
    assert built == [partitioner]
    for mine, theirs in zip(shared, alone, strict=True):
        np.testing.assert_array_equal(mine, theirs)
