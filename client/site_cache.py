"""The institution's own images as read and checked from its files, cached in its node's state folder.

A deployed node runs each message in a fresh process: whatever it read is gone by the next message.
Reading and checking a folder of PNG images again every round costs seconds, and carrying the images in
node state sent them to every ClientApp process and back. So after reading and checking its files
(client.site), a node keeps the result in `own-data-<key digest>.safetensors` in its state folder (node
config `state-dir`, else the institution's own folder), owner-only: 0600 in a folder made 0700.

The cache is keyed by everything the check depended on: the scenario's data set and label space (classes,
names, image size), the data path, and the stamp of its files (`common.files.files_stamp`: each file's name, size,
modification and change times and inode). Any change to the files changes the stamp, so they are read and
checked again; a cache of another key, or one that does not hold what a check would have let through, is
never used. Writing a new cache removes the node's older ones: no stale copy of the data stays behind.
"""

from __future__ import annotations

import hashlib
import json
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from common.files import PRIVATE, atomic_path, private_folder
from common.tasks.institution_files import LabelSpace
from common.tasks.samples import ImageSet

HEADER_KEY = "fedstill-own-data"
FORMAT = 1


def cache_key(space: LabelSpace, data_path: Path, stamp: str) -> str:
    """What a cached copy must have been read for: the label space it was checked against, the files and their stamp."""
    return json.dumps({"format": FORMAT, "dataset": space.dataset, "classes": space.num_classes, "names": list(space.names),
                       "image_size": list(space.image_size or ()), "path": str(data_path.resolve()), "stamp": stamp})


def cache_path(folder: Path, key: str) -> Path:
    return folder / f"own-data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def read_cached(folder: Path, key: str, space: LabelSpace) -> ImageSet | None:
    """The images cached for `key`; None when there are none, or the file is unreadable, of another key, or holds
    what the check would have refused (then the files are read again)."""
    path = cache_path(folder, key)
    if not path.is_file():
        return None
    try:
        arrays = load_file(str(path)) if _stored_key(path) == key else {}
    except (SafetensorError, OSError, ValueError):
        arrays = {}
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is None or labels is None or not _plausible(images, labels, space):
        log(WARNING, "the cache of this institution's data in its state folder does not match its files: reading them again")
        return None
    return ImageSet(images, labels, space.num_classes)


def keep_cached(folder: Path, key: str, data: ImageSet) -> None:
    """Cache `data` (just read and checked) for `key`, atomically and owner-only; remove the node's older caches.
    A cache that cannot be written is no error: the files are read again next time (the node's log says why)."""
    path = cache_path(folder, key)
    try:
        private_folder(folder)
        with atomic_path(path, mode=PRIVATE) as tmp:
            save_file({"images": np.ascontiguousarray(data.images),
                       "labels": np.ascontiguousarray(data.labels, dtype=np.int64)}, str(tmp), metadata={HEADER_KEY: key})
        for old in folder.glob("own-data-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
    except (OSError, SafetensorError) as error:  # the path stays in the node's log: errors reach the server
        log(WARNING, "cannot cache this institution's data in %s (%s): its files will be read again", folder, error)


def _stored_key(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return (handle.metadata() or {}).get(HEADER_KEY)
    except (SafetensorError, OSError, ValueError):
        return None


def _plausible(images: np.ndarray, labels: np.ndarray, space: LabelSpace) -> bool:
    """What the checks of client.site guarantee of images they let through: uint8 (n, h, w) of the scenario's size,
    as many int64 labels, each a class of the scenario."""
    size_ok = space.image_size is None or tuple(images.shape[1:]) == tuple(space.image_size)
    return (images.dtype == np.uint8 and images.ndim == 3 and size_ok and labels.dtype == np.int64 and labels.ndim == 1
            and len(labels) == len(images) and len(images) > 0 and int(labels.min()) >= 0 and int(labels.max()) < space.num_classes)
