"""What an institution holds: its private data, its copy of the public set, and a test set.

The private data comes from the node config's `data-path` (the institution's own files, any format of
`common.tasks.institution_files`) or, in a simulation, from `sites-dir/institution-<partition-id>/data/` when
that folder exists; otherwise from partition `partition-id` of the shared pool. The public and test
sets come from the run config's `data-dir`, or the node config's `public-dir` where this node keeps
its copy.

A problem with those files is a `DataError` that travels to the server as the reply's error: its text
there names the node-config key (`data-path`, `public-dir`), never the institution's local path; the
full text, paths included, goes to the node's own log for its operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import ERROR
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.logger import log

from client.node_state import cached_partition, forget_cached_data, keep_partition
from client.release import site_folder, state_folder
from client.site_cache import cache_key, keep_cached, read_cached
from common.config import RunConfig
from common.errors import DataError
from common.files import files_stamp
from common.node_config import NodeConfig
from common.tasks.institution_files import label_space, load_institution_data
from common.tasks.partition import partition_rows
from common.tasks.registry import load_split
from common.tasks.samples import FederatedSplit, ImageSet, Samples, public_fingerprint

SITE_DATA = "data"  # a simulated institution's data folder inside its site folder


@dataclass(frozen=True)
class Site:
    partition_id: int  # picks the teacher model and seeds; 0 for an institution with its own data and no partition-id
    private: Samples  # this institution's data (images, table rows or texts); never leaves the node
    public: Samples  # the shared transfer set
    test: Samples  # benchmark test set, used only to report the teacher's accuracy
    fingerprint: str


def load_site(cfg: RunConfig, node: NodeConfig, state: RecordDict) -> Site:
    """Load this node's private data (its own `data-path`, else its partition) and the public set.

    A partition's rows are kept in node state, so later messages skip the partitioner; the institution's own
    images are cached in its state folder (client.site_cache), never in node state. A DataError leaves without
    the node's local paths (`kept_local`).
    """
    forget_cached_data(state)
    try:
        return _load_site(cfg, node, state)
    except DataError as error:
        raise kept_local(error, local_paths(cfg, node)) from None


def local_paths(cfg: RunConfig, node: NodeConfig) -> dict[str, str]:
    """This node's own paths (as given and resolved), each with the node-config key that names it."""
    named = {"data-path": institution_data_path(cfg, node), "public-dir": node.public_dir and Path(node.public_dir)}
    paths: dict[str, str] = {}
    for key, path in named.items():
        if path is not None:
            for form in (Path(path), Path(path).expanduser(), Path(path).expanduser().resolve()):
                paths.setdefault(str(form), key)
    if len(str(Path.home())) > 1:
        paths.setdefault(str(Path.home()), "~")
    return paths


def kept_local(error: DataError, paths: dict[str, str]) -> DataError:
    """The error as the server may read it: each local path replaced by the key that names it ("data-path
    /srv/x/labels.csv: ..." -> "data-path/labels.csv: ..."); the full text goes to this node's log."""
    text = original = str(error)
    for path, key in sorted(paths.items(), key=lambda item: -len(item[0])):  # the longest (most specific) first
        text = text.replace(f"{key} {path}", key).replace(path, key)
    if text == original:
        return error
    log(ERROR, "this institution's data: %s", original)
    return type(error)(f"{text}; this node's log names the path")


def _load_site(cfg: RunConfig, node: NodeConfig, state: RecordDict) -> Site:
    data_dir = public_dir(cfg, node)
    split = load_split(cfg.dataset, data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len,
                       decoded_dir=node.state_dir and str(Path(node.state_dir).expanduser()))
    data_path = institution_data_path(cfg, node)
    if data_path is not None:
        private = _own_data(cfg, node, data_path, split)
        return Site(node.partition_id or 0, private, split.public, split.test, public_fingerprint(split.public))
    partition_id, num_partitions = node.partition(cfg.num_clients)
    key = "|".join(str(v) for v in (
        cfg.dataset, data_dir, cfg.public_size, cfg.seed, cfg.partitioner, cfg.dirichlet_alpha,
        cfg.classes_per_client, cfg.min_partition_size, partition_id, num_partitions, cfg.max_seq_len,
    ))
    rows = cached_partition(state, key)
    if rows is None:
        rows = partition_rows(split, cfg, partition_id, num_partitions)
        keep_partition(state, key, rows)
    return Site(partition_id, split.private.subset(rows), split.public, split.test, public_fingerprint(split.public))


def public_dir(cfg: RunConfig, node: NodeConfig) -> str:
    """Where this node's copy of the public set lives: node config `public-dir`, else run config `data-dir`."""
    return cfg.data_dir if node.public_dir is None else str(Path(node.public_dir).expanduser())


def institution_data_path(cfg: RunConfig, node: NodeConfig) -> Path | None:
    """Node config `data-path`; in a simulation, `sites-dir/institution-<partition-id>/data` if it exists; else None."""
    if node.data_path is not None:
        return Path(node.data_path).expanduser()
    if cfg.sites_dir and node.partition_id is not None:
        folder = site_folder(cfg.sites_dir, node.partition_id) / SITE_DATA
        if folder.exists():
            return folder
    return None


def _own_data(cfg: RunConfig, node: NodeConfig, data_path: Path, split: FederatedSplit) -> Samples:
    """Read and check the institution's own data; images come from the node's cache (client.site_cache) while its
    files are unchanged, else they are read and checked and the cache is renewed. Tables and texts are small and
    read again each message. Tables are standardised and texts tokenized by the preprocessing fitted on the
    public set (FederatedSplit.prepare)."""
    space = label_space(cfg.dataset, split.public)
    if split.task != "image":
        return split.prepare(load_institution_data(data_path, space))
    folder = state_folder(cfg, node)
    key = cache_key(space, data_path, files_stamp(data_path))
    cached = None if folder is None else read_cached(folder, key, space)
    if cached is not None:
        return cached
    data = load_institution_data(data_path, space)
    if not isinstance(data, ImageSet):  # load_institution_data refuses other tasks' formats: a guard, not a check
        raise DataError(f"data-path {data_path} does not hold images; scenario dataset {cfg.dataset} is an image task")
    if folder is not None:
        keep_cached(folder, key, data)
    return data
