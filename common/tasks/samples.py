"""What every data set loader produces: the sample sets, the public/private/test split and its fingerprint.

Three tasks share one split: images (`ImageSet`), tables (`TabularSet`) and texts (`TextSet`). Each
set's `inputs` is the array its models consume, told apart by dtype (see `common.models.inputs.inputs_to_tensor`).
The loaders are `common.tasks.images`, `common.tasks.tabular` and `common.tasks.text`; each takes a
`SplitRequest` and returns a `FederatedSplit`. `common.tasks.registry` names them, one `DatasetSpec`
per data set, and dispatches `load_split`. This module imports no loader.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.errors import DataError

TASKS = ("image", "tabular", "text")  # the kinds of data a data set holds and a model fits


@dataclass(frozen=True)
class ImageSet:
    """Images and labels of one split."""

    images: np.ndarray  # (n, height, width) uint8
    labels: np.ndarray  # (n,) int64 in [0, num_classes)
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.num_classes)

    @property
    def inputs(self) -> np.ndarray:
        """What image models consume: the uint8 images."""
        return self.images


@dataclass(frozen=True)
class TabularSet:
    """Rows of numeric features and their labels."""

    features: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int64 in [0, num_classes)
    feature_names: tuple[str, ...]
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> TabularSet:
        return TabularSet(self.features[indices], self.labels[indices], self.feature_names, self.num_classes)

    @property
    def inputs(self) -> np.ndarray:
        """What tabular models consume: the float32 features (standardised once the split prepared them)."""
        return self.features


@dataclass(frozen=True)
class TextSet:
    """Texts and their labels; `tokens` once a task's tokenizer has encoded them."""

    texts: tuple[str, ...]
    labels: np.ndarray  # (n,) int64 in [0, num_classes)
    num_classes: int
    tokens: np.ndarray | None = None  # (n, max_seq_len) int64 token ids, 0 = padding

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> TextSet:
        tokens = None if self.tokens is None else self.tokens[indices]
        return TextSet(tuple(self.texts[i] for i in np.asarray(indices)), self.labels[indices], self.num_classes, tokens)

    @property
    def inputs(self) -> np.ndarray:
        """What text models consume: the int64 token ids."""
        if self.tokens is None:
            raise DataError("texts are not tokenized yet: prepare them with the split (FederatedSplit.prepare)")
        return self.tokens


Samples = ImageSet | TabularSet | TextSet


class Preprocessor(Protocol):
    """Turns raw data of the task into what its models consume, with settings fitted on the public set only."""

    def prepare(self, data: Samples) -> Samples: ...


@dataclass(frozen=True)
class FederatedSplit:
    """The fixed split every party derives from the same data and seed."""

    public: Samples  # transfer set every party holds (labels used only for reporting)
    private: Samples  # pool the institutions' partitions are drawn from
    test: Samples  # held-out evaluation set
    groups: np.ndarray | None = None  # (len(private),) int64 natural institution of each private row, if any
    preprocessor: Preprocessor | None = None  # fitted on `public`; applied to an institution's own data

    @property
    def task(self) -> str:
        return task_of(self.public)

    def prepare(self, data: Samples) -> Samples:
        """An institution's own data in the form its models consume (standardised, tokenized), by the
        preprocessing fitted on the public set: nothing of any institution's data goes into it."""
        return data if self.preprocessor is None else self.preprocessor.prepare(data)


def task_of(data: Samples) -> str:
    """"image", "tabular" or "text"."""
    return "image" if isinstance(data, ImageSet) else "tabular" if isinstance(data, TabularSet) else "text"


@dataclass(frozen=True)
class SplitRequest:
    """What a loader is asked for: the scenario's data set and the sizes and seed of its split."""

    dataset: str
    data_dir: str  # folder of the image files (Fashion-MNIST); the packaged data sets ignore it
    public_size: int
    seed: int
    test_size: int = 0  # 0: the whole test set, or a fifth of the rows where the data set has no test set
    max_seq_len: int = 128  # text tasks' length in tokens
    decoded_dir: str | None = None  # where a deployed node keeps decoded copies of compressed files (tasks.decoded)


def split_rows(n: int, public_size: int, test_size: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Public, test and private row indices of a data set without its own test set: one seeded permutation of
    its `n` rows (`what`, for example "covid-testing has 15524 rows", names them in the error); `test_size` 0
    means a fifth of the rows. Public and test indices are sorted, the private ones stay permuted."""
    test_size = test_size or n // 5
    if public_size + test_size >= n:
        raise DataError(f"public-size {public_size} and test-size {test_size} leave no private data: {what}; "
                        f"choose smaller sizes")
    order = np.random.default_rng(seed).permutation(n)
    return (np.sort(order[:public_size]), np.sort(order[public_size:public_size + test_size]),
            order[public_size + test_size:])


def public_fingerprint(public: Samples) -> str:
    """sha256 of the canonical bytes of the public set: a header, then the model inputs in C order
    (images; standardised features; token ids, then the texts themselves).

    Labels are left out on purpose: a transfer set is usually unlabelled.
    """
    if isinstance(public, TabularSet):
        features = np.ascontiguousarray(public.features, dtype=np.float32)
        digest = hashlib.sha256(f"fedstill-public-v1|float32|{features.shape}|{','.join(public.feature_names)}|".encode())
        digest.update(features.tobytes())
        return digest.hexdigest()
    if isinstance(public, TextSet):
        tokens = np.ascontiguousarray(public.inputs, dtype=np.int64)
        digest = hashlib.sha256(f"fedstill-public-v1|int64|{tokens.shape}|".encode())
        digest.update(tokens.tobytes())
        for text in public.texts:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        return digest.hexdigest()
    images = np.ascontiguousarray(public.images, dtype=np.uint8)
    digest = hashlib.sha256(f"fedstill-public-v1|uint8|{images.shape}|".encode())
    digest.update(images.tobytes())
    return digest.hexdigest()
