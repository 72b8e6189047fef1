"""Unit tests of common/tasks/images.py, samples.py and registry.load_split: idx loading, the public/private/test
split and the public fingerprint.

Corruption tests write small idx folders of their own under `tmp_path` (one folder per test, since
`common.tasks.images._load_fashion_mnist` caches by folder path); only a few tests read the real Fashion-MNIST files.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from common.errors import DataError
from common.tasks.registry import load_split
from common.tasks.samples import ImageSet, public_fingerprint

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGES_MAGIC = 2051  # idx: 0x00 0x00, type 0x08 (uint8), 3 dims
LABELS_MAGIC = 2049  # idx: 0x00 0x00, type 0x08 (uint8), 1 dim
N_TRAIN, N_TEST, SIDE = 200, 50, 4
FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------------------------------------------
# Helpers: small, valid idx folders whose images carry their own index
# ---------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Valid idx bytes: big-endian magic, one big-endian uint32 per dim, then the uint8 data."""
    if magic is None:
        magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def tagged_images(n: int, offset: int) -> np.ndarray:
    """`(n, 4, 4)` uint8 images; pixels (0, 0) and (0, 1) hold the image's id `offset + i` in base 256."""
    rng = np.random.default_rng(n + offset)
    images = rng.integers(0, 256, size=(n, SIDE, SIDE), dtype=np.uint8)
    ids = np.arange(n) + offset
    images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
    return images


def image_ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0].astype(np.int64) * 256 + images[:, 0, 1]


def write_idx_folder(folder: Path, gz: bool = True) -> dict[str, np.ndarray]:
    """Write the four idx files of a tiny Fashion-MNIST look-alike; labels are `id % 10`."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images": tagged_images(N_TRAIN, 0),
        "train-labels": np.arange(N_TRAIN) % 10,
        "test-images": tagged_images(N_TEST, 1000),
        "test-labels": (np.arange(N_TEST) + 1000) % 10,
    }
    for key, array in arrays.items():
        write_file(folder, key, idx_bytes(array), gz=gz)
    return arrays


def write_file(folder: Path, key: str, raw: bytes, gz: bool = True) -> Path:
    """Write (or overwrite) one of the four files; `raw` is gzipped when `gz`."""
    path = folder / (FILES[key] + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def load_tiny(folder: Path, public_size: int = 50, seed: int = 7, test_size: int = 0):
    return load_split("fashion-mnist", str(folder), public_size, seed, test_size)


# ---------------------------------------------------------------------------------------------------
# Loading idx folders
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_idx_folder_loads_as_uint8_images_and_int64_labels(tmp_path: Path, gz: bool) -> None:
    # Prepare
    arrays = write_idx_folder(tmp_path / "fmnist", gz=gz)

    # Execute
    split = load_tiny(tmp_path / "fmnist")

    # Assert
    for part in (split.public, split.private, split.test):
        assert part.images.dtype == np.uint8 and part.images.shape[1:] == (SIDE, SIDE)
        assert part.labels.dtype == np.int64 and part.labels.shape == (len(part),)
        assert part.num_classes == 10
        np.testing.assert_array_equal(part.labels, image_ids(part.images) % 10)
    np.testing.assert_array_equal(split.test.images, arrays["test-images"])


def test_loaded_arrays_are_read_only(tmp_path: Path) -> None:
    # Prepare
    write_idx_folder(tmp_path / "fmnist")

    # Execute
    split = load_tiny(tmp_path / "fmnist")

    # Assert: the test set is the cached array itself, so it must not be writable
    assert not split.test.images.flags.writeable
    assert not split.test.labels.flags.writeable


def test_missing_folder_is_a_data_error(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "nowhere"

    # Execute / Assert
    with pytest.raises(DataError, match=r"Fashion-MNIST folder .*nowhere does not exist: install .*dataset-fashion-mnist"):
        load_tiny(folder)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "fmnist"
    write_idx_folder(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()

    # Execute / Assert
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\(\.gz\) in .*fmnist"):
        load_tiny(folder)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda gz: b"this is not gzip data at all", id="not-gzip"),
        pytest.param(lambda gz: gz[: len(gz) // 2], id="truncated-gzip"),
        pytest.param(lambda gz: gz[:-8] + bytes(b ^ 0xFF for b in gz[-8:-4]) + gz[-4:], id="bad-crc"),
    ],
)
def test_corrupt_gzip_is_a_data_error(tmp_path: Path, corrupt) -> None:
    # Prepare
    folder = tmp_path / "fmnist"
    arrays = write_idx_folder(folder)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(corrupt(gzip.compress(idx_bytes(arrays["train-images"]), mtime=0)))

    # Execute / Assert
    with pytest.raises(DataError, match=r"cannot read .*train-images-idx3-ubyte\.gz: .*the file is corrupt"):
        load_tiny(folder)


def test_corrupt_deflate_stream_is_a_data_error(tmp_path: Path) -> None:
    # Prepare: a gzip member header followed by a deflate block of reserved type 0b11 (invalid)
    folder = tmp_path / "fmnist"
    write_idx_folder(folder)
    header = b"\x1f\x8b\x08\x00" + b"\x00" * 4 + b"\x00\xff"
    (folder / "train-images-idx3-ubyte.gz").write_bytes(header + b"\x07" + b"\x00" * 8)

    # Execute / Assert
    with pytest.raises(DataError, match="cannot read .*train-images-idx3-ubyte.gz"):
        load_tiny(folder)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_bad_magic_is_a_data_error(tmp_path: Path, gz: bool) -> None:
    # Prepare
    folder = tmp_path / "fmnist"
    arrays = write_idx_folder(folder, gz=gz)
    write_file(folder, "train-labels", idx_bytes(arrays["train-labels"], magic=1234), gz=gz)

    # Execute / Assert
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.* is not an idx file \(magic number 1234\)"):
        load_tiny(folder)


def test_file_shorter_than_a_header_is_a_data_error(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "fmnist"
    write_idx_folder(folder)
    write_file(folder, "test-labels", b"\x00\x00\x08")

    # Execute / Assert
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is too short to be an idx file"):
        load_tiny(folder)


@pytest.mark.parametrize(("cut", "extra"), [(3, b""), (0, b"\x00\x01")], ids=["truncated", "trailing-bytes"])
def test_length_disagreeing_with_header_is_a_data_error(tmp_path: Path, cut: int, extra: bytes) -> None:
    # Prepare
    folder = tmp_path / "fmnist"
    arrays = write_idx_folder(folder)
    raw = idx_bytes(arrays["train-images"])
    raw = raw[: len(raw) - cut] + extra
    write_file(folder, "train-images", raw)
    expected = 16 + N_TRAIN * SIDE * SIDE

    # Execute / Assert
    with pytest.raises(
        DataError,
        match=re.escape(f"holds {len(raw)} bytes but its header ({N_TRAIN}, {SIDE}, {SIDE}) needs {expected}")
        + ": the file is truncated or corrupt",
    ):
        load_tiny(folder)


def test_images_and_labels_of_different_length_are_a_data_error(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "fmnist"
    write_idx_folder(folder)
    write_file(folder, "train-labels", idx_bytes(np.arange(N_TRAIN - 1) % 10))

    # Execute / Assert
    with pytest.raises(DataError, match=rf"train images and labels in .* differ in length \({N_TRAIN} vs {N_TRAIN - 1}\)"):
        load_tiny(folder)


def test_label_above_nine_is_a_data_error(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "fmnist"
    write_idx_folder(folder)
    labels = np.arange(N_TEST) % 10
    labels[3] = 10
    write_file(folder, "test-labels", idx_bytes(labels))

    # Execute / Assert
    with pytest.raises(DataError, match="test labels in .* exceed 9: the file is corrupt"):
        load_tiny(folder)


def test_labels_file_in_place_of_images_is_a_data_error(tmp_path: Path) -> None:
    # Prepare: train-images holds a valid labels idx file of the right length
    folder = tmp_path / "fmnist"
    write_idx_folder(folder)
    write_file(folder, "train-images", idx_bytes(np.arange(N_TRAIN) % 10))

    # Execute / Assert
    with pytest.raises(DataError, match="train-images"):
        load_tiny(folder)


def test_unknown_dataset_is_a_data_error(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "unused"

    # Execute / Assert
    with pytest.raises(DataError, match="unknown dataset 'cifar10'; use one of 'fashion-mnist', 'digits'"):
        load_split("cifar10", str(folder), 10, 0)


# ---------------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------------


def test_split_is_a_seeded_permutation_of_the_training_set(tmp_path: Path) -> None:
    # Prepare: the documented rule, computed independently: the first public-size shuffled indices
    write_idx_folder(tmp_path / "fmnist")
    public_size, seed = 60, 3
    expected_public = np.sort(np.random.default_rng(seed).permutation(N_TRAIN)[:public_size])

    # Execute
    split = load_tiny(tmp_path / "fmnist", public_size=public_size, seed=seed)

    # Assert
    public_ids, private_ids = image_ids(split.public.images), image_ids(split.private.images)
    assert len(split.public) == public_size
    assert len(split.private) == N_TRAIN - public_size
    np.testing.assert_array_equal(public_ids, expected_public)
    assert not set(public_ids) & set(private_ids)
    assert sorted(set(public_ids) | set(private_ids)) == list(range(N_TRAIN))
    assert len(split.test) == N_TEST


def test_split_is_deterministic_and_depends_on_the_seed(tmp_path: Path) -> None:
    # Prepare
    write_idx_folder(tmp_path / "fmnist")

    # Execute
    first = load_tiny(tmp_path / "fmnist", seed=1)
    again = load_tiny(tmp_path / "fmnist", seed=1)
    other = load_tiny(tmp_path / "fmnist", seed=2)

    # Assert
    np.testing.assert_array_equal(first.public.images, again.public.images)
    np.testing.assert_array_equal(first.private.images, again.private.images)
    np.testing.assert_array_equal(first.private.labels, again.private.labels)
    assert not np.array_equal(image_ids(first.public.images), image_ids(other.public.images))


def test_test_size_keeps_a_seeded_subset_of_the_test_set(tmp_path: Path) -> None:
    # Prepare
    write_idx_folder(tmp_path / "fmnist")

    # Execute
    first = load_tiny(tmp_path / "fmnist", seed=5, test_size=20)
    again = load_tiny(tmp_path / "fmnist", seed=5, test_size=20)

    # Assert
    ids = image_ids(first.test.images)
    assert len(first.test) == 20
    assert len(set(ids)) == 20 and set(ids) <= set(range(1000, 1000 + N_TEST))
    np.testing.assert_array_equal(first.test.images, again.test.images)
    np.testing.assert_array_equal(first.test.labels, ids % 10)


@pytest.mark.parametrize("public_size", [N_TRAIN, N_TRAIN + 1, 10 * N_TRAIN])
def test_public_size_leaving_no_private_data_is_a_data_error(tmp_path: Path, public_size: int) -> None:
    # Prepare
    write_idx_folder(tmp_path / "fmnist")

    # Execute / Assert
    with pytest.raises(
        DataError,
        match=rf"public-size {public_size} leaves no private data: the fashion-mnist training set has {N_TRAIN} samples",
    ):
        load_tiny(tmp_path / "fmnist", public_size=public_size)


def test_digits_split_sizes_and_shapes() -> None:
    # Prepare: sklearn digits has 1,797 samples, split 80/20 into 1,437 train and 360 test
    public_size = 300

    # Execute
    split = load_split("digits", "", public_size, seed=42)

    # Assert
    assert (len(split.public), len(split.private), len(split.test)) == (300, 1137, 360)
    for part in (split.public, split.private, split.test):
        assert part.images.dtype == np.uint8 and part.images.shape[1:] == (8, 8)
        assert part.labels.dtype == np.int64
        assert set(np.unique(part.labels)) == set(range(10))
    assert split.public.images.max() == 255


def test_digits_split_is_deterministic() -> None:
    # Prepare
    args = ("digits", "", 300)

    # Execute
    first, again, other = load_split(*args, seed=42), load_split(*args, seed=42), load_split(*args, seed=43)

    # Assert
    np.testing.assert_array_equal(first.public.images, again.public.images)
    np.testing.assert_array_equal(first.private.labels, again.private.labels)
    np.testing.assert_array_equal(first.test.images, again.test.images)
    assert public_fingerprint(first.public) != public_fingerprint(other.public)


def test_digits_public_size_of_whole_train_set_is_a_data_error() -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="public-size 1437 leaves no private data: the digits training set has 1437"):
        load_split("digits", "", 1437, seed=42)


def test_digits_cached_test_set_is_read_only() -> None:
    # Execute
    split = load_split("digits", "", 300, seed=42)

    # Assert
    assert not split.test.images.flags.writeable
    assert not split.test.labels.flags.writeable


# ---------------------------------------------------------------------------------------------------
# Real Fashion-MNIST (few tests: loading takes about a second)
# ---------------------------------------------------------------------------------------------------

needs_fashion_mnist = pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / f"{stem}.gz").is_file() for stem in FILES.values()),
    reason=f"Fashion-MNIST idx files not installed in {FASHION_MNIST_DIR}",
)


@pytest.fixture(scope="module")
def fashion_split():
    return load_split("fashion-mnist", str(FASHION_MNIST_DIR), public_size=10000, seed=42)


@needs_fashion_mnist
def test_fashion_mnist_split_sizes_and_shapes(fashion_split) -> None:
    # Execute
    split = fashion_split

    # Assert
    assert (len(split.public), len(split.private), len(split.test)) == (10000, 50000, 10000)
    for part in (split.public, split.private, split.test):
        assert part.images.dtype == np.uint8 and part.images.shape[1:] == (28, 28)
        assert set(np.unique(part.labels)) == set(range(10))
        assert part.num_classes == 10
    assert not split.test.images.flags.writeable


@needs_fashion_mnist
def test_fashion_mnist_public_fingerprint_matches_an_independent_derivation(fashion_split) -> None:
    # Prepare: read the raw file ourselves and apply the documented split rule
    raw = gzip.decompress((FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").read_bytes())
    train = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(60000, 28, 28)
    public = train[np.sort(np.random.default_rng(42).permutation(60000)[:10000])]
    expected = hashlib.sha256(b"fedstill-public-v1|uint8|(10000, 28, 28)|" + public.tobytes()).hexdigest()

    # Execute
    fingerprint = public_fingerprint(fashion_split.public)

    # Assert
    assert fingerprint == expected


# ---------------------------------------------------------------------------------------------------
# The public fingerprint
# ---------------------------------------------------------------------------------------------------


def canonical_digest(images: np.ndarray) -> str:
    """The documented canonical bytes: `fedstill-public-v1|uint8|{shape}|` then the images in C order."""
    header = f"fedstill-public-v1|uint8|{tuple(images.shape)}|".encode()
    return hashlib.sha256(header + np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def test_fingerprint_golden_value() -> None:
    # Prepare
    images = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    expected = hashlib.sha256(b"fedstill-public-v1|uint8|(2, 2, 3)|" + bytes(range(12))).hexdigest()

    # Execute
    fingerprint = public_fingerprint(ImageSet(images, np.zeros(2, dtype=np.int64), 10))

    # Assert
    assert fingerprint == expected
    assert fingerprint == "d12c9cc13d9cc8bbec542fc348e8946a4b1bdbd830097e5d98be1d64a4484a5d"


def test_fingerprint_is_stable_for_equal_data_and_ignores_labels() -> None:
    # Prepare
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    one = ImageSet(images, np.zeros(5, dtype=np.int64), 10)
    other = ImageSet(images.copy(), np.arange(5, dtype=np.int64), 10)

    # Execute
    first, second = public_fingerprint(one), public_fingerprint(other)

    # Assert
    assert first == second
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_fingerprint_changes_with_one_pixel() -> None:
    # Prepare
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    changed = images.copy()
    changed[4, 3, 3] = 1
    labels = np.zeros(5, dtype=np.int64)

    # Execute
    before = public_fingerprint(ImageSet(images, labels, 10))
    after = public_fingerprint(ImageSet(changed, labels, 10))

    # Assert
    assert before != after


def test_fingerprint_depends_on_shape_not_only_bytes() -> None:
    # Prepare
    flat = np.arange(24, dtype=np.uint8)
    labels = np.zeros(2, dtype=np.int64)

    # Execute
    wide = public_fingerprint(ImageSet(flat.reshape(2, 3, 4), labels, 10))
    tall = public_fingerprint(ImageSet(flat.reshape(2, 4, 3), labels, 10))

    # Assert
    assert wide != tall


def test_fingerprint_of_a_strided_view_equals_that_of_its_copy() -> None:
    # Prepare
    images = np.random.default_rng(1).integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
    view = images[::2, :, ::-1]
    labels = np.zeros(3, dtype=np.int64)

    # Execute
    from_view = public_fingerprint(ImageSet(view, labels, 10))
    from_copy = public_fingerprint(ImageSet(np.ascontiguousarray(view), labels, 10))

    # Assert
    assert from_view == from_copy


@settings(max_examples=30, deadline=None)
@given(images=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, max_side=6)))
def test_fingerprint_is_sha256_of_the_canonical_bytes(images: np.ndarray) -> None:
    # Prepare
    public = ImageSet(images, np.zeros(images.shape[0], dtype=np.int64), 10)

    # Execute
    fingerprint = public_fingerprint(public)

    # Assert
    assert fingerprint == canonical_digest(images)


@needs_fashion_mnist
def test_fashion_mnist_split_is_made_once_per_process_and_read_only(fashion_split) -> None:
    # Execute: a simulation worker serving another node
    again = load_split("fashion-mnist", str(FASHION_MNIST_DIR), public_size=10000, seed=42)

    # Assert
    assert again is fashion_split
    for part in (again.public, again.private, again.test):
        assert not part.images.flags.writeable and not part.labels.flags.writeable
    other = load_split("fashion-mnist", str(FASHION_MNIST_DIR), public_size=9000, seed=42)
    assert len(other.public) == 9000 and other is not fashion_split
