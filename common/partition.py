"""Partitioning the private pool among institutions with Flower Datasets partitioners."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner, Partitioner

from common.errors import ConfigError, DataError


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partition_id: int,
    partitioner: str,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 10,
    seed: int = 42,
) -> np.ndarray:
    """Indices into `labels` (the private pool) that belong to partition `partition_id`.

    Deterministic for fixed arguments, so every node computes its own share without coordination.
    `iid` takes contiguous shards, which is IID because the private pool is already shuffled.
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id {partition_id} is outside [0, {num_partitions}); check the node config "
            "(partition-id, num-partitions) against num-clients"
        )
    table = Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    chosen = _build(partitioner, num_partitions, alpha, classes_per_client, min_partition_size, seed)
    chosen.dataset = table
    try:
        rows = chosen.load_partition(partition_id)["row"]
    except ValueError as error:
        raise DataError(
            f"{partitioner} partitioning of {len(labels)} samples into {num_partitions} parts failed: "
            f"{error}; lower min-partition-size or raise dirichlet-alpha"
        ) from None
    return np.asarray(sorted(rows), dtype=np.int64)


def _build(name: str, n: int, alpha: float, classes: int, min_size: int, seed: int) -> Partitioner:
    if name == "iid":
        return IidPartitioner(num_partitions=n)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=alpha,
            min_partition_size=min_size, self_balancing=False, seed=seed,
        )
    if name == "pathological":
        return PathologicalPartitioner(
            num_partitions=n, partition_by="label", num_classes_per_partition=classes,
            class_assignment_mode="first-deterministic", seed=seed,
        )
    raise ConfigError(f"unknown partitioner {name!r}; use iid, dirichlet or pathological")
