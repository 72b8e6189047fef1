"""What an institution holds: its private partition, its copy of the public set, and a test set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.config import RunConfig
from common.data import ImageSet, load_split, public_fingerprint
from common.errors import ConfigError
from common.partition import partition_indices

PARTITION_KEY = "partition"
PARTITION_META_KEY = "partition-meta"


@dataclass(frozen=True)
class Site:
    partition_id: int
    private: ImageSet  # this institution's data; never leaves the node
    public: ImageSet  # the shared transfer set
    test: ImageSet  # benchmark test set, used only to report the teacher's accuracy
    fingerprint: str


def load_site(cfg: RunConfig, node_config: Mapping[str, Any], state: RecordDict) -> Site:
    """Load this node's partition of the private pool (node config `partition-id`, `num-partitions`).

    The partition's row indices are kept in node state, so later rounds skip the partitioner.
    """
    partition_id, num_partitions = _partition_of(node_config, cfg)
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)
    key = "|".join(str(v) for v in (
        cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.partitioner, cfg.dirichlet_alpha,
        cfg.classes_per_client, cfg.min_partition_size, partition_id, num_partitions,
    ))
    cached = state.get(PARTITION_META_KEY)
    if isinstance(cached, ConfigRecord) and cached.get("key") == key and PARTITION_KEY in state:
        rows = state[PARTITION_KEY]["rows"].numpy()
    else:
        rows = partition_indices(
            split.private.labels, num_partitions, partition_id, cfg.partitioner,
            alpha=cfg.dirichlet_alpha, classes_per_client=cfg.classes_per_client,
            min_partition_size=cfg.min_partition_size, seed=cfg.seed,
        )
        state[PARTITION_KEY] = ArrayRecord({"rows": Array(rows)})
        state[PARTITION_META_KEY] = ConfigRecord({"key": key})
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
