"""Image data sets: Fashion-MNIST read from its idx files, and sklearn's bundled digits for fast tests.

Fashion-MNIST is read from the four idx files (gzip or plain) in a folder, by default where Debian's
`dataset-fashion-mnist` package puts them. Images are kept as uint8 arrays `(n, height, width)`;
models scale them to [0, 1]. Both data sets have their own test set: the split is a seeded
permutation of the training set (public set first, then the private pool), and `test-size` > 0 keeps
a seeded subset of the test set. `read_idx`/`write_idx` also serve institutions' own idx files.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import zlib
from functools import partial
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.tasks.decoded import decoded
from common.tasks.samples import FederatedSplit, ImageSet, SplitRequest

FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot")
DIGITS_LABELS = tuple(str(digit) for digit in range(10))
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
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def load_fashion_mnist_split(request: SplitRequest) -> FederatedSplit:
    """Fashion-MNIST from the idx files in `request.data_dir`, split by `split_train_test`."""
    return _fashion_mnist_split(str(Path(request.data_dir).expanduser().resolve()), request)


@functools.lru_cache(maxsize=2)
def _fashion_mnist_split(folder: str, request: SplitRequest) -> FederatedSplit:
    """The split, once per process and read-only: a simulation worker serving many nodes would otherwise copy the
    60,000 training images into public set and private pool for every message (a tenth of a ClientApp's time at
    1,000 institutions)."""
    train, test = _load_fashion_mnist(folder, request.decoded_dir)
    public, private = _public_and_private(request, train)
    for part in (public, private):
        part.images.setflags(write=False)
        part.labels.setflags(write=False)
    return FederatedSplit(public, private, _test_subset(request, test))


def load_digits_split(request: SplitRequest) -> FederatedSplit:
    """sklearn's digits (its own seeded 80/20 train/test split first), split by `split_train_test`."""
    train, test = _load_digits(request.seed)
    return split_train_test(request, train, test)


def split_train_test(request: SplitRequest, train: ImageSet, test: ImageSet) -> FederatedSplit:
    """The first `public_size` samples of a seeded permutation of `train` are the public set, the rest the
    private pool; `test_size` > 0 keeps a seeded subset of `test`."""
    public, private = _public_and_private(request, train)
    return FederatedSplit(public, private, _test_subset(request, test))


def _public_and_private(request: SplitRequest, train: ImageSet) -> tuple[ImageSet, ImageSet]:
    if request.public_size >= len(train):
        raise DataError(
            f"public-size {request.public_size} leaves no private data: the {request.dataset} training set has "
            f"{len(train)} samples; choose a smaller public-size"
        )
    order = np.random.default_rng(request.seed).permutation(len(train))
    public, private = order[:request.public_size], order[request.public_size:]
    return train.subset(np.sort(public)), train.subset(private)


def _test_subset(request: SplitRequest, test: ImageSet) -> ImageSet:
    if not request.test_size:
        return test
    return test.subset(np.sort(np.random.default_rng(request.seed + 1).permutation(len(test))[:request.test_size]))


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(folder: str, decoded_dir: str | None = None) -> tuple[ImageSet, ImageSet]:
    """Read the four idx files once per process (decoded once into `decoded_dir` when given: common.tasks.decoded);
    the arrays are read-only."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {folder} does not exist: {FASHION_MNIST_FIX}")
    keep = None if decoded_dir is None else Path(decoded_dir)
    arrays = {key: decoded(_find_idx(root, stem), keep, partial(read_idx, fix=FASHION_MNIST_FIX))
              for key, stem in FASHION_MNIST_FILES.items()}
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
    pixels, target = _digits_arrays()
    images = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(len(labels) * 0.8)
    train, test = np.sort(order[:cut]), np.sort(order[cut:])
    sets = (ImageSet(images[train], labels[train], 10), ImageSet(images[test], labels[test], 10))
    for part in sets:
        part.images.setflags(write=False)
        part.labels.setflags(write=False)
    return sets


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as `load_digits` returns them ((1797, 8, 8) float64 pixels in 0..16, int targets), read from
    the CSV file sklearn bundles as `load_digits` reads it, without importing sklearn: that import (SciPy with it)
    cost a deployed node's ClientApp process seconds on every message. sklearn's own loader if the file is not there."""
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(next(iter(folders))) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, mode="rt", encoding="utf-8") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
