"""`fedstill site-data`: write each institution's partition of a scenario as its own data folder.

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
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.errors import ConfigError, DataError, FedstillError

FORMATS = ("idx", "images")
IMAGES_FILE = "train-images-idx3-ubyte"
LABELS_FILE = "train-labels-idx1-ubyte"
console = Console(soft_wrap=True)


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
    from common.tasks.samples import load_split, public_fingerprint
    from common.tasks.partition import partition_rows

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folders = [site_folder(out, i) / SITE_DATA for i in range(cfg.num_clients)]
    taken = [f for f in folders if f.exists() and any(f.iterdir())]
    if taken and not overwrite:
        raise DataError(f"{taken[0]} already holds data ({len(taken)} of {len(folders)} folders do); "
                        "choose another --out or pass --overwrite")
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
    if split.task != "image":
        raise ConfigError(f"site-data writes image data (idx or per-class images); dataset {cfg.dataset} is a "
                          f"{split.task} task: its institutions bring their own CSV/Parquet or JSONL (docs/tasks.md)")
    written = []
    for partition_id, folder in enumerate(folders):
        rows = partition_rows(split, cfg, partition_id)
        part = split.private.subset(rows)
        if folder.exists():
            shutil.rmtree(folder)  # --overwrite: replace the folder as a whole
        (write_idx_folder if fmt == "idx" else write_image_folders)(folder, part.images, part.labels)
        counts = np.bincount(part.labels, minlength=part.num_classes).astype(np.int64)
        written.append(WrittenSite(folder.parent.name, folder, counts))
    return written, public_fingerprint(split.public)


def write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """`train-images-idx3-ubyte` and `train-labels-idx1-ubyte` (uncompressed) in `folder`."""
    from common.tasks.samples import write_idx

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


def site_data(
    scenario: str = typer.Argument(None, help="Scenario name (see `fedstill scenarios`) or a .toml file of run-config keys."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for institution-<i>/data/ (one per institution)."),
    format_: str = typer.Option("idx", "--format", "-f", help="idx (train-images/labels idx files) or images (class folders of PNGs)."),
    num_clients: int = typer.Option(0, min=0, help="Number of institutions (0: the scenario's num-clients)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a run-config key: --set partitioner=dirichlet (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace data folders that already hold data."),
) -> None:
    """Write each institution's partition of a scenario as its own data folder (for demos, tests and deployment)."""
    from simulations.scenarios import resolve

    try:
        # --num-clients may go below the scenario's quorum (min-clients), which does not matter here
        sets = list(set_) + ([f"num-clients={num_clients}", "min-clients=1"] if num_clients else [])
        _, cfg = resolve(scenario, sets, Path.cwd())
        written, fingerprint = write_site_data(cfg, out, format_, overwrite)
    except FedstillError as error:
        console.print(f"[red]{type(error).__name__}[/]: {escape(str(error))}")
        raise typer.Exit(code=1) from None
    _report(cfg, written, fingerprint, format_)


def _report(cfg, written: list[WrittenSite], fingerprint: str, fmt: str) -> None:
    table = Table(title=f"{cfg.scenario}: {len(written)} institutions, {cfg.partitioner}, {fmt}")
    table.add_column("institution", no_wrap=True)
    table.add_column("samples", justify="right")
    for label in range(len(written[0].class_counts)):
        table.add_column(str(label), justify="right")
    for site in written:
        table.add_row(site.name, str(int(site.class_counts.sum())), *(str(int(c)) for c in site.class_counts))
    console.print(table)
    console.print("samples per class (columns: class index); written to:")
    for site in written:
        console.print(f"  {escape(str(site.folder.resolve()))}")
    console.print(f"public set: {cfg.dataset}, public-size {cfg.public_size}, seed {cfg.seed}, fingerprint {fingerprint[:16]}...")
    first = escape(str(written[0].folder.resolve()))
    console.print(f"deployment: flower-supernode ... --node-config 'data-path=\"{first}\"' (one folder per institution)")
    console.print("simulation: with --set sites-dir=<--out folder>, each institution reads its data/ folder "
                  "(its keys must be beside it: see docs/deployment.md, Institution data)")
