"""Each institution's partition of a scenario as its own data folder (what `fedstill site-data` writes).

`DIR/institution-<i>/data/` gets partition `i` of the scenario's private pool, exactly as a simulated
node would draw it, as idx files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`) or as class
folders of PNG images (`<class index>/<n>.png`). A SuperNode reads it with
`--node-config 'data-path="DIR/institution-<i>/data"'`; a simulation whose `sites-dir` is DIR reads
it in place of the partition.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import ConfigError, DataError

FORMATS = ("idx", "images")
IMAGES_FILE = "train-images-idx3-ubyte"
LABELS_FILE = "train-labels-idx1-ubyte"


@dataclass(frozen=True)
class WrittenSite:
    name: str  # institution-<i>
    folder: Path  # its data folder
    class_counts: np.ndarray  # (C,) int64 samples per class


def write_site_data(cfg, out: Path, fmt: str = "idx", overwrite: bool = False) -> tuple[list[WrittenSite], str]:
    """Write every institution's partition of `cfg`'s private pool under `out`; return what was written and
    the public set's fingerprint (what each institution's copy of the public set must match)."""
    from client.release import site_folder
    from client.site import SITE_DATA
    from common.tasks.partition import partition_rows
    from common.tasks.registry import load_split
    from common.tasks.samples import ImageSet, public_fingerprint

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folders = [site_folder(out, i) / SITE_DATA for i in range(cfg.num_clients)]
    taken = [f for f in folders if f.exists() and any(f.iterdir())]
    if taken and not overwrite:
        raise DataError(f"{taken[0]} already holds data ({len(taken)} of {len(folders)} folders do); "
                        "choose another --out or pass --overwrite")
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
    private = split.private
    if split.task != "image" or not isinstance(private, ImageSet):
        raise ConfigError(f"site-data writes image data (idx or per-class images); dataset {cfg.dataset} is a "
                          f"{split.task} task: its institutions bring their own CSV/Parquet or JSONL (docs/tasks.md)")
    written = []
    for partition_id, folder in enumerate(folders):
        rows = partition_rows(split, cfg, partition_id)
        part = private.subset(rows)
        if folder.exists():
            shutil.rmtree(folder)  # --overwrite: replace the folder as a whole
        (write_idx_folder if fmt == "idx" else write_image_folders)(folder, part.images, part.labels)
        counts = np.bincount(part.labels, minlength=part.num_classes).astype(np.int64)
        written.append(WrittenSite(folder.parent.name, folder, counts))
    return written, public_fingerprint(split.public)


def write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """`train-images-idx3-ubyte` and `train-labels-idx1-ubyte` (uncompressed) in `folder`."""
    from common.tasks.images import write_idx

    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / IMAGES_FILE, images)
    write_idx(folder / LABELS_FILE, labels)


def write_image_folders(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One folder per class present, named by its index, of 8-bit grayscale PNGs numbered in data order."""
    from PIL import Image

    for label in np.unique(labels):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
        for number, index in enumerate(np.flatnonzero(labels == label)):
            Image.fromarray(np.ascontiguousarray(images[index], dtype=np.uint8), mode="L").save(
                folder / str(int(label)) / f"{number:06d}.png")
