"""Decoded copies of compressed idx files in a deployed node's state folder (common/tasks/decoded.py)."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from common.tasks.decoded import decoded
from common.tasks.images import read_idx
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint

IMAGES_MAGIC = 2051
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_gz(path: Path, array: np.ndarray) -> Path:
    """A gzip-compressed idx file of `array` (uint8, 1 or 3 dimensions)."""
    magic = IMAGES_MAGIC if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))
    return path


class Reader:
    """read_idx, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> np.ndarray:
        self.calls += 1
        return read_idx(path)


def images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(20, 4, 4), dtype=np.uint8)


def test_a_compressed_file_is_decoded_once_and_then_mapped_read_only(tmp_path: Path) -> None:
    # Prepare
    source = idx_gz(tmp_path / "train-images-idx3-ubyte.gz", images(1))
    state, read = tmp_path / "state", Reader()

    # Execute
    first = decoded(source, state, read)
    second = decoded(source, state, read)

    # Assert: one decompression; the second is the copy, mapped, equal and read-only; the copy is owner-only
    assert read.calls == 1
    np.testing.assert_array_equal(first, images(1))
    np.testing.assert_array_equal(second, images(1))
    assert isinstance(second, np.memmap) and not second.flags.writeable
    (copy,) = state.glob("decoded-train-images-idx3-ubyte-*.npy")
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_rewritten_file_is_decoded_again_and_its_old_copy_removed(tmp_path: Path) -> None:
    # Prepare: decoded once, then the file is replaced with other images
    source = idx_gz(tmp_path / "train-images-idx3-ubyte.gz", images(1))
    state, read = tmp_path / "state", Reader()
    decoded(source, state, read)
    idx_gz(source, images(2))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1_000_000))

    # Execute
    again = decoded(source, state, read)

    # Assert
    assert read.calls == 2
    np.testing.assert_array_equal(again, images(2))
    assert len(list(state.glob("decoded-*.npy"))) == 1


@pytest.mark.parametrize("damage", [b"not a numpy file", None], ids=["garbage", "float-array"])
def test_a_damaged_copy_is_decoded_again(tmp_path: Path, damage: bytes | None) -> None:
    # Prepare: the copy overwritten with garbage, or with an array the idx reader never returns
    source = idx_gz(tmp_path / "train-images-idx3-ubyte.gz", images(1))
    state, read = tmp_path / "state", Reader()
    decoded(source, state, read)
    (copy,) = state.glob("decoded-*.npy")
    if damage is None:
        np.save(copy, np.zeros((20, 4, 4), dtype=np.float32))
    else:
        copy.write_bytes(damage)

    # Execute
    again = decoded(source, state, read)

    # Assert
    assert read.calls == 2
    np.testing.assert_array_equal(again, images(1))


def test_no_folder_or_a_plain_file_is_read_as_before(tmp_path: Path) -> None:
    # Prepare
    source = idx_gz(tmp_path / "train-images-idx3-ubyte.gz", images(1))
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.write_bytes(gzip.decompress(source.read_bytes()))
    read = Reader()

    # Execute
    decoded(source, None, read)
    decoded(plain, tmp_path / "state", read)

    # Assert: read each time, nothing kept
    assert read.calls == 2 and not (tmp_path / "state").exists()


def test_a_folder_that_cannot_be_written_costs_nothing_but_the_decoding(tmp_path: Path) -> None:
    # Prepare: the state folder's place is taken by a file
    source = idx_gz(tmp_path / "train-images-idx3-ubyte.gz", images(1))
    blocked = tmp_path / "state"
    blocked.write_text("a file, not a folder")

    # Execute
    array = decoded(source, blocked, Reader())

    # Assert
    np.testing.assert_array_equal(array, images(1))


def test_a_split_from_decoded_copies_is_the_same_split(tmp_path: Path) -> None:
    # Prepare: a tiny Fashion-MNIST look-alike, compressed
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name, n in zip(FILES, (200, 200, 50, 50), strict=True):
        array = rng.integers(0, 256, size=(n, 4, 4)) if "images" in name else rng.integers(0, 10, size=n)
        idx_gz(folder / f"{name}.gz", array)

    # Execute: without a folder, then twice with one (decoding, then mapping)
    plain = load_split("fashion-mnist", str(folder), 50, 7)
    first = load_split("fashion-mnist", str(folder), 50, 7, decoded_dir=str(tmp_path / "state"))
    mapped = load_split("fashion-mnist", str(folder), 50, 7, decoded_dir=str(tmp_path / "state-2"))
    again = load_split("fashion-mnist", str(folder), 50, 7, decoded_dir=str(tmp_path / "state-2"))

    # Assert: the same public set (fingerprint), private pool and test set
    assert len(list((tmp_path / "state").glob("decoded-*.npy"))) == 4
    for split in (first, mapped, again):
        assert public_fingerprint(split.public) == public_fingerprint(plain.public)
        np.testing.assert_array_equal(split.private.images, plain.private.images)
        np.testing.assert_array_equal(split.test.labels, plain.test.labels)
