"""What an institution holds: its private partition, its copy of the public set, and a test set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import RunConfig
from common.data import ImageSet, load_split, public_fingerprint
from common.errors import ConfigError
from common.partition import partition_indices


@dataclass(frozen=True)
class Site:
    partition_id: int
    private: ImageSet  # this institution's data; never leaves the node
    public: ImageSet  # the shared transfer set
    test: ImageSet  # benchmark test set, used only to report the teacher's accuracy
    fingerprint: str


def load_site(cfg: RunConfig, node_config: Mapping[str, Any]) -> Site:
    """Load this node's partition of the private pool (node config `partition-id`, `num-partitions`)."""
    partition_id, num_partitions = _partition_of(node_config, cfg)
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)
    rows = partition_indices(
        split.private.labels, num_partitions, partition_id, cfg.partitioner,
        alpha=cfg.dirichlet_alpha, classes_per_client=cfg.classes_per_client,
        min_partition_size=cfg.min_partition_size, seed=cfg.seed,
    )
    return Site(partition_id, split.private.subset(rows), split.public, split.test, public_fingerprint(split.public))


def _partition_of(node_config: Mapping[str, Any], cfg: RunConfig) -> tuple[int, int]:
    partition_id = node_config.get("partition-id")
    num_partitions = node_config.get("num-partitions", cfg.num_clients)
    if not isinstance(partition_id, int) or not isinstance(num_partitions, int):
        raise ConfigError(
            "node config needs integer 'partition-id' (and 'num-partitions'); start the SuperNode with "
            "--node-config 'partition-id=0 num-partitions=10'"
        )
    return partition_id, num_partitions
