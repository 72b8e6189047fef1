"""Decoded copies of gzip-compressed idx files, kept in a deployed node's state folder.

A deployed node answers each message in a fresh process, so it would decompress the public set's idx files
(Fashion-MNIST: 26 MB of gzip, 0.4 s) for every message. With a folder given (node config `state-dir`), the
decoded array is written there once as `decoded-<file>-<stamp>.npy`, owner-only, and later processes map it
read-only from the page cache. The stamp is a digest of the compressed file's path, size, modification and
change times and inode: a replaced or rewritten file is decoded again and its older copies removed. A copy
that is unreadable or not what the idx reader returns (uint8, 1 or 3 dimensions) is decoded again; a copy
that cannot be written is no error (the node's log says why, and the file is decoded as before). Whatever a
copy held, the public set's fingerprint is computed from the arrays and checked by the coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.files import PRIVATE, atomic_path, files_stamp, private_folder

LOG = logging.getLogger(__name__)


def decoded(path: Path, folder: Path | None, read: Callable[[Path], np.ndarray]) -> np.ndarray:
    """`read(path)`, from the copy decoded into `folder` when there is one (read-only, memory-mapped); a
    compressed file read without a copy leaves one there. No folder, or a file that is not gzip: `read(path)`."""
    if folder is None or path.suffix != ".gz":
        return read(path)
    copy = folder / f"decoded-{path.stem}-{files_stamp(path.resolve())[:16]}.npy"
    kept = _kept(copy)
    if kept is not None:
        return kept
    array = read(path)
    try:
        private_folder(folder)
        with atomic_path(copy, mode=PRIVATE, suffix=".npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        for old in folder.glob(f"decoded-{path.stem}-*.npy"):
            if old != copy:
                old.unlink(missing_ok=True)
    except OSError as error:
        LOG.warning("cannot keep a decoded copy of %s in %s (%s): it is decompressed for every message", path.name,
                    folder, error)
    return array


def _kept(copy: Path) -> np.ndarray | None:
    if not copy.is_file():
        return None
    try:
        array = np.load(copy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        LOG.warning("the decoded copy %s is unreadable (%s): decoding its file again", copy.name, error)
        return None
    return array if array.dtype == np.uint8 and array.ndim in (1, 3) else None
