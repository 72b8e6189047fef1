"""What an institution holds: its private data, its copy of the public set, and a test set.

The private data comes from the node config's `data-path` (the institution's own files, any format of
`common.tasks.institution_files`) or, in a simulation, from `sites-dir/institution-<partition-id>/data/` when
that folder exists; otherwise from partition `partition-id` of the shared pool. The public and test
sets come from the run config's `data-dir`, or the node config's `public-dir` where this node keeps
its copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client.release import site_folder
from common.config import RunConfig
from common.tasks.samples import FederatedSplit, ImageSet, Samples, load_split, public_fingerprint
from common.errors import ConfigError, DataError
from common.tasks.institution_files import label_space, load_institution_data
from common.tasks.partition import partition_rows

PARTITION_KEY = "partition"
PARTITION_META_KEY = "partition-meta"
OWN_DATA_KEY = "own-data"
OWN_DATA_META_KEY = "own-data-meta"
SITE_DATA = "data"  # a simulated institution's data folder inside its site folder


@dataclass(frozen=True)
class Site:
    partition_id: int  # picks the teacher model and seeds; 0 for an institution with its own data and no partition-id
    private: Samples  # this institution's data (images, table rows or texts); never leaves the node
    public: Samples  # the shared transfer set
    test: Samples  # benchmark test set, used only to report the teacher's accuracy
    fingerprint: str


def load_site(cfg: RunConfig, node_config: Mapping[str, Any], state: RecordDict) -> Site:
    """Load this node's private data (its own `data-path`, else its partition) and the public set.

    What was read is kept in node state, so later rounds skip the partitioner or the files.
    """
    data_dir = public_dir(cfg, node_config)
    split = load_split(cfg.dataset, data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
    data_path = institution_data_path(cfg, node_config)
    if data_path is not None:
        partition_id = node_config.get("partition-id", 0)
        private = _own_data(cfg, data_path, split, state)
        return Site(partition_id if isinstance(partition_id, int) else 0, private, split.public, split.test,
                    public_fingerprint(split.public))
    partition_id, num_partitions = _partition_of(node_config, cfg)
    key = "|".join(str(v) for v in (
        cfg.dataset, data_dir, cfg.public_size, cfg.seed, cfg.partitioner, cfg.dirichlet_alpha,
        cfg.classes_per_client, cfg.min_partition_size, partition_id, num_partitions, cfg.max_seq_len,
    ))
    cached = state.get(PARTITION_META_KEY)
    if isinstance(cached, ConfigRecord) and cached.get("key") == key and PARTITION_KEY in state:
        rows = state[PARTITION_KEY]["rows"].numpy()
    else:
        rows = partition_rows(split, cfg, partition_id, num_partitions)
        state[PARTITION_KEY] = ArrayRecord({"rows": Array(rows)})
        state[PARTITION_META_KEY] = ConfigRecord({"key": key})
    return Site(partition_id, split.private.subset(rows), split.public, split.test, public_fingerprint(split.public))


def public_dir(cfg: RunConfig, node_config: Mapping[str, Any]) -> str:
    """Where this node's copy of the public set lives: node config `public-dir`, else run config `data-dir`."""
    value = node_config.get("public-dir")
    if value is None:
        return cfg.data_dir
    if not isinstance(value, str) or not value:
        raise ConfigError(f"node config public-dir must be a folder path (a string), got {value!r}; for example "
                          "--node-config 'public-dir=\"/data/fashion-mnist\"'")
    return str(Path(value).expanduser())


def institution_data_path(cfg: RunConfig, node_config: Mapping[str, Any]) -> Path | None:
    """Node config `data-path`; in a simulation, `sites-dir/institution-<partition-id>/data` if it exists; else None."""
    value = node_config.get("data-path")
    if value is not None:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"node config data-path must be a path (a string), got {value!r}; start the SuperNode "
                              "with --node-config 'data-path=\"/abs/path/to/data\"'")
        return Path(value).expanduser()
    partition_id = node_config.get("partition-id")
    if cfg.sites_dir and isinstance(partition_id, int):
        folder = site_folder(cfg.sites_dir, partition_id) / SITE_DATA
        if folder.exists():
            return folder
    return None


def _own_data(cfg: RunConfig, data_path: Path, split: FederatedSplit, state: RecordDict) -> Samples:
    """Read (and check) the institution's own data, or take it from node state if its files are unchanged
    (images; tables and texts are small and read again each round). Tables are standardised and texts
    tokenized by the preprocessing fitted on the public set (FederatedSplit.prepare)."""
    if split.task != "image":
        return split.prepare(load_institution_data(data_path, label_space(cfg.dataset, split.public)))
    key = f"{cfg.dataset}|{data_path.resolve()}|{_files_stamp(data_path)}"
    cached = state.get(OWN_DATA_META_KEY)
    if isinstance(cached, ConfigRecord) and cached.get("key") == key and OWN_DATA_KEY in state:
        record = state[OWN_DATA_KEY]
        return ImageSet(record["images"].numpy(), record["labels"].numpy(), split.public.num_classes)
    data = load_institution_data(data_path, label_space(cfg.dataset, split.public))
    if not isinstance(data, ImageSet):  # load_institution_data refuses other tasks' formats: a guard, not a check
        raise DataError(f"data-path {data_path} does not hold images; scenario dataset {cfg.dataset} is an image task")
    state[OWN_DATA_KEY] = ArrayRecord({"images": Array(data.images), "labels": Array(data.labels)})
    state[OWN_DATA_META_KEY] = ConfigRecord({"key": key})
    return data


def _files_stamp(path: Path) -> str:
    """A digest of the names, sizes and modification times of the files under `path`: changes when they do."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    for file in files:
        stat = file.stat()
        digest.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _partition_of(node_config: Mapping[str, Any], cfg: RunConfig) -> tuple[int, int]:
    partition_id = node_config.get("partition-id")
    num_partitions = node_config.get("num-partitions", cfg.num_clients)
    if not isinstance(partition_id, int) or not isinstance(num_partitions, int):
        raise ConfigError(
            "node config needs a 'data-path' to this institution's data (or, to use a partition of the shared pool, "
            "integer 'partition-id' and 'num-partitions'); start the SuperNode with "
            "--node-config 'data-path=\"/abs/path/to/data\"'"
        )
    return partition_id, num_partitions
