"""Partitioning the private pool among institutions with Flower Datasets partitioners.

`natural` keeps a data set's own institution boundaries (the clinic that ran each test): Flower
Datasets' NaturalIdPartitioner over the split's `groups`, after `natural_groups` folds the smallest
institutions into one so that there are exactly `num-clients` of them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import ConfigError, DataError

if TYPE_CHECKING:  # Flower Datasets (and with it `datasets`, pandas, matplotlib) is imported on first use
    from flwr_datasets.partitioner import Partitioner

    from common.tasks.samples import FederatedSplit


def partition_rows(split: FederatedSplit, cfg: Any, partition_id: int, num_partitions: int | None = None) -> np.ndarray:
    """Rows of `split.private` that belong to partition `partition_id` under `cfg`'s partitioner
    (`cfg`: a RunConfig; `num_partitions` defaults to its num-clients)."""
    return partition_indices(
        split.private.labels, num_partitions or cfg.num_clients, partition_id, cfg.partitioner,
        alpha=cfg.dirichlet_alpha, classes_per_client=cfg.classes_per_client,
        min_partition_size=cfg.min_partition_size, seed=cfg.seed, groups=split.groups,
    )


def natural_groups(ids: np.ndarray, num_partitions: int) -> np.ndarray:
    """Natural ids `(n,)` folded into `num_partitions` groups `0..num_partitions-1`: the
    `num_partitions - 1` largest institutions keep their own group (0 = the largest; ties by id), every
    other institution goes to the last group. With as many institutions as partitions, each keeps its own."""
    values, counts = np.unique(np.asarray(ids), return_counts=True)
    if len(values) < num_partitions:
        raise DataError(f"natural partitioning into {num_partitions} institutions: the private pool has only "
                        f"{len(values)} natural institutions; lower num-clients to at most {len(values)}")
    order = sorted(range(len(values)), key=lambda i: (-counts[i], i))
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values))
    return np.minimum(rank[np.searchsorted(values, ids)], num_partitions - 1)


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
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Indices into `labels` (the private pool) that belong to partition `partition_id`.

    Deterministic for fixed arguments, so every node computes its own share without coordination.
    `iid` takes contiguous shards, which is IID because the private pool is already shuffled.
    `natural` needs `groups`, the natural institution of each row (see `natural_groups`).
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id {partition_id} is outside [0, {num_partitions}); check the node config "
            "(partition-id, num-partitions) against num-clients"
        )
    if partitioner == "natural" and groups is None:
        raise ConfigError("partitioner 'natural' needs a data set with natural institutions (covid-testing: "
                          "its clinics); use iid, dirichlet or pathological for this dataset")
    natural = None if groups is None or partitioner != "natural" else np.asarray(groups)
    chosen = _partitioned(np.asarray(labels).tobytes(), str(np.asarray(labels).dtype),
                          None if natural is None else natural.tobytes(), None if natural is None else str(natural.dtype),
                          partitioner, num_partitions, alpha, classes_per_client, min_partition_size, seed)
    try:
        rows = chosen.load_partition(partition_id)["row"]
    except ValueError as error:
        raise DataError(
            f"{partitioner} partitioning of {len(labels)} samples into {num_partitions} parts failed: "
            f"{error}; lower min-partition-size or raise dirichlet-alpha"
        ) from None
    return np.asarray(sorted(rows), dtype=np.int64)


@functools.lru_cache(maxsize=2)
def _partitioned(labels: bytes, labels_dtype: str, groups: bytes | None, groups_dtype: str | None, partitioner: str,
                 num_partitions: int, alpha: float, classes: int, min_size: int, seed: int) -> Partitioner:
    """The partitioner over the rows, kept per process: Flower Datasets assigns every partition's rows on the first
    `load_partition` (for Dirichlet, seconds at 1,000 partitions) and each later partition id only selects its own,
    so one simulation worker serving many nodes partitions once, not once per node (O(n) each: O(n^2) a run)."""
    from datasets import Dataset

    label_values = np.frombuffer(labels, dtype=labels_dtype)
    columns = {"label": label_values.tolist(), "row": list(range(len(label_values)))}
    if groups is not None and groups_dtype is not None:
        columns["group"] = natural_groups(np.frombuffer(groups, dtype=groups_dtype), num_partitions).tolist()
    chosen = _build(partitioner, num_partitions, alpha, classes, min_size, seed)
    chosen.dataset = Dataset.from_dict(columns)
    return chosen


def _build(name: str, n: int, alpha: float, classes: int, min_size: int, seed: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, PathologicalPartitioner

    if name == "natural":  # partition i is group i: NaturalIdPartitioner numbers the sorted ids
        return NaturalIdPartitioner(partition_by="group")
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
    raise ConfigError(f"unknown partitioner {name!r}; use iid, dirichlet, pathological or natural")
