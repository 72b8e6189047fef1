"""Loading a scenario's data set and splitting it into public transfer set, private pool and test set.

Three tasks share one split: images (`ImageSet`), tables (`TabularSet`) and texts (`TextSet`). Each
set's `inputs` is the array its models consume, told apart by dtype (see `common.models.registry.inputs_to_tensor`).
Fashion-MNIST is read from the four idx files (gzip or plain) in a folder, by default where
Debian's `dataset-fashion-mnist` package puts them; sklearn's bundled digits serve fast tests.
Images are kept as uint8 arrays `(n, height, width)`; models scale them to [0, 1]. The tabular
data sets are in `common.tasks.tabular`, the text data set in `common.tasks.text`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from common.errors import DataError

FASHION_MNIST_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_FIX = (
    "install Debian's package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or "
    "download the four idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from "
    "https://github.com/zalandoresearch/fashion-mnist and set data-dir to their folder"
)
LABEL_NAMES = {  # class names per dataset, in class-index order
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "digits": tuple(str(digit) for digit in range(10)),
    "covid-testing": ("negative", "positive", "invalid"),
    "credit-data": ("good", "bad"),
    "bbc-news": ("business", "entertainment", "politics", "sports", "tech"),
}
IMAGE_DATASETS = ("fashion-mnist", "digits")
TABULAR_DATASETS = ("covid-testing", "credit-data")
TEXT_DATASETS = ("bbc-news",)
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


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


def load_split(dataset: str, data_dir: str, public_size: int, seed: int, test_size: int = 0, *,
               max_seq_len: int = 128) -> FederatedSplit:
    """Load `dataset` and split its training part into public transfer set and private pool.

    The split is a seeded permutation: the first `public_size` shuffled training samples are the
    public set, the rest the private pool. `test_size` > 0 keeps a seeded subset of the test set.
    Tabular and text data sets have no separate test set: theirs is carved from the same
    permutation (`test_size`, or a fifth of the rows when 0). `max_seq_len` is the text tasks' length
    in tokens.
    """
    if dataset in TABULAR_DATASETS:
        from common.tasks.tabular import load_tabular_split

        return load_tabular_split(dataset, public_size, seed, test_size)
    if dataset in TEXT_DATASETS:
        from common.tasks.text import load_text_split

        return load_text_split(dataset, public_size, seed, test_size, max_seq_len)
    train, test = _load_train_test(dataset, data_dir, seed)
    if public_size >= len(train):
        raise DataError(
            f"public-size {public_size} leaves no private data: the {dataset} training set has "
            f"{len(train)} samples; choose a smaller public-size"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    public, private = order[:public_size], order[public_size:]
    if test_size:
        test = test.subset(np.sort(np.random.default_rng(seed + 1).permutation(len(test))[:test_size]))
    return FederatedSplit(train.subset(np.sort(public)), train.subset(private), test)


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


def _load_train_test(dataset: str, data_dir: str, seed: int) -> tuple[ImageSet, ImageSet]:
    if dataset == "fashion-mnist":
        return _load_fashion_mnist(str(Path(data_dir).expanduser().resolve()))
    if dataset == "digits":
        return _load_digits(seed)
    known = ", ".join(repr(d) for d in IMAGE_DATASETS + TABULAR_DATASETS + TEXT_DATASETS)
    raise DataError(f"unknown dataset {dataset!r}; use one of {known}")


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(folder: str) -> tuple[ImageSet, ImageSet]:
    """Read the four idx files once per process; the arrays are read-only."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {folder} does not exist: {FASHION_MNIST_FIX}")
    arrays = {key: read_idx(_find_idx(root, stem), FASHION_MNIST_FIX) for key, stem in FASHION_MNIST_FILES.items()}
    for part in ("train", "test"):
        if arrays[f"{part}-images"].shape[0] != arrays[f"{part}-labels"].shape[0]:
            raise DataError(
                f"Fashion-MNIST {part} images and labels in {folder} differ in length "
                f"({arrays[f'{part}-images'].shape[0]} vs {arrays[f'{part}-labels'].shape[0]}): "
                f"the files are corrupt or mixed up; {FASHION_MNIST_FIX}"
            )
    sets = []
    for part in ("train", "test"):
        labels = arrays[f"{part}-labels"].astype(np.int64)
        if labels.size and labels.max() > 9:
            raise DataError(f"Fashion-MNIST {part} labels in {folder} exceed 9: the file is corrupt")
        images = arrays[f"{part}-images"]
        images.setflags(write=False)
        labels.setflags(write=False)
        sets.append(ImageSet(images, labels, 10))
    return sets[0], sets[1]


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing {stem}(.gz) in {root}: {FASHION_MNIST_FIX}")


def read_idx(path: Path, fix: str = "re-download it") -> np.ndarray:
    """Parse an idx file (big-endian header: magic, dims; then uint8 data); images must be 3-d.

    `fix` ends every error message: what the owner of the file should do about it.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read {path}: {error}; the file is corrupt, {fix}") from None
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an idx file; the file is corrupt, {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise DataError(f"{path} is not an idx file (magic number {magic}); the file is corrupt, {fix}")
    ndim = 3 if magic == IDX_IMAGES_MAGIC else 1
    if ("images" in path.name) != (ndim == 3):
        wanted = "images (magic 2051)" if "images" in path.name else "labels (magic 2049)"
        raise DataError(f"{path} should hold {wanted} but its magic number is {magic}; the files are mixed up, {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is too short for its idx header ({header} bytes); the file is corrupt, {fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes but its header {shape} needs {expected}: the file is "
            f"truncated or corrupt, {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 images `(n, height, width)` or labels `(n,)` as an idx file (the inverse of `read_idx`)."""
    array = np.ascontiguousarray(array)
    if array.ndim not in (1, 3) or array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(f"idx: can write uint8 images (n, h, w) or labels (n,), got shape {array.shape}")
    magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape))
    Path(path).write_bytes(header + array.astype(np.uint8).tobytes())


@functools.lru_cache(maxsize=2)
def _load_digits(seed: int) -> tuple[ImageSet, ImageSet]:
    """sklearn's bundled 8x8 digits (1,797 samples), 80/20 seeded train/test split, scaled to uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(len(labels) * 0.8)
    train, test = np.sort(order[:cut]), np.sort(order[cut:])
    sets = (ImageSet(images[train], labels[train], 10), ImageSet(images[test], labels[test], 10))
    for part in sets:
        part.images.setflags(write=False)
        part.labels.setflags(write=False)
    return sets
