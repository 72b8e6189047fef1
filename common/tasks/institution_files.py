"""An institution's own private data, read from its node config's `data-path` in the format it holds.

What `data-path` may hold (the format is detected, never configured):

    idx      a folder with `<prefix>-images-idx3-ubyte` and `<prefix>-labels-idx1-ubyte` (each optionally
             .gz); several prefixes are read in sorted order and concatenated
    images   a folder of class folders, `<data-path>/<class>/*.png|*.jpg|*.jpeg`, each class named by its
             index (`3`) or its label name (`dress`, `ankle-boot`); 8-bit grayscale, the public set's size
    csv      a CSV file (or a folder holding one): a `label` column and numeric feature columns
    parquet  the same as a Parquet file
    jsonl    a JSONL file (or a folder holding one): `{"text": ..., "label": ...}` per line

Images give an `ImageSet`, tables a `TabularSet`, texts a `TextSet`; a format of another task than the
scenario's is refused. Every problem raises `DataError` naming it and its fix, and nothing is
silently dropped. Messages name files, line numbers, columns and counts, never values read from a
file (no label, no class folder's name): a client's errors travel to the server, and the ClientApp
(client/site.py) replaces the local paths in them by `data-path`, keeping the full text in the node's log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.tasks.images import read_idx
from common.tasks.registry import label_names
from common.tasks.samples import ImageSet, Samples, TabularSet, TextSet, task_of

IDX_PATTERN = re.compile(r"^(?P<prefix>.+)-(?P<kind>images-idx3|labels-idx1)-ubyte(?P<gz>\.gz)?$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}
FORMAT_TASKS = {"idx": "image", "images": "image", "csv": "tabular", "parquet": "tabular", "jsonl": "text"}
FORMAT_WORDS = {"idx": "idx image", "images": "per-class image", "csv": "tabular CSV", "parquet": "tabular Parquet",
                "jsonl": "text JSONL"}
TASK_LAYOUTS = {
    "image": "a folder of idx files (<prefix>-images-idx3-ubyte and <prefix>-labels-idx1-ubyte, optionally .gz) "
             "or of per-class image folders, <data-path>/<class>/*.png",
    "tabular": "a CSV or Parquet file with a 'label' column and numeric feature columns",
    "text": 'a JSONL file with one {"text": ..., "label": ...} object per line',
}
IDX_FIX = "export the file again; `fedstill site-data --format idx` writes an example of the layout"
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class LabelSpace:
    """What the scenario expects of an institution's data: its task, classes and (images) size."""

    dataset: str
    task: str  # "image", "tabular" or "text"
    num_classes: int
    names: tuple[str, ...] = ()  # label names in class-index order, if the dataset has them
    image_size: tuple[int, int] | None = None  # (height, width) of the public set's images
    _by_name: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {_normal(name): i for i, name in enumerate(self.names)})

    def parse(self, value: str) -> int | None:
        """Class index of a label given as text: an integer (maybe out of range) or a label name; None if neither."""
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        return self._by_name.get(_normal(text))

    def describe(self) -> str:
        named = self.names and any(not n.isdigit() for n in self.names)
        names = f" or label names: {', '.join(_normal(n) for n in self.names)}" if named else ""
        return f"class indices 0..{self.num_classes - 1}{names}"


def image_label_space(dataset: str, public: ImageSet) -> LabelSpace:
    """The label space of an image scenario: its dataset's classes and the public set's image size."""
    height, width = public.images.shape[1:]
    return LabelSpace(dataset, "image", public.num_classes, label_names(dataset), (int(height), int(width)))


def label_space(dataset: str, public: Samples) -> LabelSpace:
    """The label space of any scenario: its task (from the public set), classes and, for images, size."""
    if isinstance(public, ImageSet):
        return image_label_space(dataset, public)
    return LabelSpace(dataset, task_of(public), public.num_classes, label_names(dataset))


PrivateData = ImageSet | TabularSet | TextSet


def load_institution_data(data_path: str | Path, space: LabelSpace) -> PrivateData:
    """Read and check the data at `data_path` against `space`; refuse a format of another task."""
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"data-path {path} does not exist; set the node config's data-path to the absolute path of "
                        f"this institution's data: {TASK_LAYOUTS[space.task]}")
    try:
        fmt, source = detect_format(path, space)
        if FORMAT_TASKS[fmt] != space.task:
            raise DataError(
                f"data-path {path} holds {FORMAT_WORDS[fmt]} data but scenario dataset {space.dataset} is "
                f"{_article(space.task)} {space.task} task; point data-path at {TASK_LAYOUTS[space.task]}"
            )
        if fmt in ("idx", "images"):
            return (read_idx_folder if fmt == "idx" else read_image_folders)(source, space)
        return read_jsonl(source, space) if fmt == "jsonl" else read_table(source, fmt, space)
    except OSError as error:  # a folder or file the node may not list or open
        raise DataError(f"cannot read {error.filename or path} ({error.strerror or type(error).__name__}); make "
                        "data-path readable by the user that runs the SuperNode") from None


def detect_format(path: Path, space: LabelSpace | None = None) -> tuple[str, Path]:
    """(format, the file or folder to read) of what `path` holds; DataError when it is none of the formats
    (naming the layouts of `space`'s task, or of every task)."""
    layouts = TASK_LAYOUTS[space.task] if space else "; ".join(f"{t}: {lay}" for t, lay in TASK_LAYOUTS.items())
    if path.is_file():
        if path.suffix.lower() in TABLE_SUFFIXES:
            return TABLE_SUFFIXES[path.suffix.lower()], path
        if IDX_PATTERN.match(path.name):
            raise DataError(f"data-path {path} is a single idx file; point data-path at the folder holding both "
                            "<prefix>-images-idx3-ubyte and <prefix>-labels-idx1-ubyte")
        raise DataError(f"data-path {path} is a file of unknown format ({path.suffix or 'no suffix'}); "
                        f"accepted: {layouts}")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        raise DataError(f"data-path {path} is an empty folder; put this institution's data there: {layouts}")
    files = [p for p in entries if p.is_file()]
    folders = [p for p in entries if p.is_dir()]
    idx = [p for p in files if IDX_PATTERN.match(p.name)]
    tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
    if idx and (folders or len(idx) < len(files)):
        others = [p.name for p in entries if p not in idx]
        raise DataError(f"data-path {path} holds idx files and also {_names(others)}; keep only the idx files there")
    if idx:
        return "idx", path
    if folders:
        if files:
            raise DataError(f"data-path {path} holds class folders and also the files {_names(files)}; the image "
                            "layout is <data-path>/<class>/*.png: move those files into a class folder or out of data-path")
        return "images", path
    if len(tables) == 1 and len(files) == 1:
        return TABLE_SUFFIXES[tables[0].suffix.lower()], tables[0]
    if tables:
        raise DataError(f"data-path {path} holds several files ({_names(files)}); keep one data file there, "
                        "or point data-path at the file itself")
    raise DataError(f"data-path {path} holds no data in a known format (found {_names(files)}); accepted: {layouts}")


def read_idx_folder(folder: Path, space: LabelSpace) -> ImageSet:
    """Every `<prefix>-images-idx3-ubyte` with its `<prefix>-labels-idx1-ubyte` (optionally .gz), in sorted prefix order."""
    pairs: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = IDX_PATTERN.match(path.name)
        if match is None:
            continue
        kind = "images" if match["kind"].startswith("images") else "labels"
        slot = pairs.setdefault(match["prefix"], {})
        if kind in slot:
            raise DataError(f"data-path {folder} holds both {slot[kind].name} and {path.name}; keep one of them")
        slot[kind] = path
    images, labels = [], []
    for prefix, slot in sorted(pairs.items()):
        for kind, other in (("images", "labels"), ("labels", "images")):
            if kind not in slot:
                partner = slot[other].name
                raise DataError(f"data-path {folder}: {partner} has no matching {prefix}-{kind}-"
                                f"{'idx3' if kind == 'images' else 'idx1'}-ubyte(.gz); each images file needs its labels file")
        pixels, targets = read_idx(slot["images"], IDX_FIX), read_idx(slot["labels"], IDX_FIX)
        if len(pixels) != len(targets):
            raise DataError(f"data-path {folder}: {slot['images'].name} holds {len(pixels)} images but "
                            f"{slot['labels'].name} holds {len(targets)} labels; export the two files together again")
        _check_image_size(tuple(pixels.shape[1:]), space, f"data-path {folder}: the images in {slot['images'].name} are")
        images.append(pixels)
        labels.append(targets.astype(np.int64))
    stacked = np.concatenate(images) if len(images) > 1 else images[0]
    checked = check_labels(np.concatenate(labels), space, f"data-path {folder}")
    return _image_set(stacked, checked, space, folder)


def read_image_folders(folder: Path, space: LabelSpace) -> ImageSet:
    """`<folder>/<class>/*.png|jpg|jpeg`, ordered by class index, then file name."""
    classes: dict[int, Path] = {}
    unknown, outside = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        index = space.parse(sub.name)
        if index is None:
            unknown.append(sub.name)
        elif not 0 <= index < space.num_classes:
            outside.append(sub.name)
        elif index in classes:
            raise DataError(f"data-path {folder}: class folders {classes[index].name!r} and {sub.name!r} both name "
                            f"class {index}; merge them into one")
        else:
            classes[index] = sub
    if unknown or outside:
        problem = (f"{len(unknown)} class folders are not classes of {space.dataset}" if unknown else
                   f"{len(outside)} class folders lie outside the label space [0, {space.num_classes})")
        raise DataError(f"data-path {folder}: {problem}; name class folders by {space.describe()}")
    images, labels = [], []
    for index, sub in sorted(classes.items()):
        files = sorted(p for p in sub.iterdir() if not p.name.startswith("."))
        others = [p for p in files if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            raise DataError(f"data-path {folder}: class folder {sub.name!r} holds {_names(others)}, which are not "
                            "PNG or JPEG images; remove them or convert them")
        if not files:
            raise DataError(f"data-path {folder}: class folder {sub.name!r} holds no images; add its images or remove it")
        images += [_gray_image(path, space) for path in files]
        labels += [index] * len(files)
    return _image_set(np.stack(images), np.asarray(labels, dtype=np.int64), space, folder)


def _gray_image(path: Path, space: LabelSpace) -> np.ndarray:
    """One 8-bit grayscale image (colour files are accepted only when every pixel is gray)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "1", "P", "LA", "RGB", "RGBA"):
                raise DataError(f"image {path} has pixel mode {image.mode}; save it as 8-bit grayscale, mode L")
            pixels = np.asarray(image if image.mode == "L" else image.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({type(error).__name__}); the file is corrupt: "
                        "export it again or remove it") from None
    if pixels.ndim == 3:
        if not ((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()):
            raise DataError(f"image {path} is in colour; the task's images are grayscale: convert it to 8-bit grayscale")
        pixels = pixels[..., 0]
    _check_image_size(tuple(pixels.shape), space, f"image {path} is")
    return pixels


def read_table(path: Path, fmt: str, space: LabelSpace) -> TabularSet:
    """A CSV or Parquet table: the `label` column and numeric feature columns, every row kept."""
    import pandas as pd

    try:
        frame = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except Exception as error:  # noqa: BLE001 - pandas and pyarrow raise many types for one cause: an unreadable file
        raise DataError(f"cannot read {path} as {fmt.upper()} ({type(error).__name__}); the file is corrupt or not "
                        f"{fmt.upper()}: export it again") from None
    where = f"data-path {path}"
    if LABEL_COLUMN not in frame.columns:
        raise DataError(f"{where} has no '{LABEL_COLUMN}' column (columns: {_names([str(c) for c in frame.columns])}); "
                        f"rename the column holding the class to {LABEL_COLUMN}")
    if frame.empty:
        raise DataError(f"{where} holds no rows; export this institution's data into it")
    features = frame.drop(columns=[LABEL_COLUMN])
    if features.shape[1] == 0:
        raise DataError(f"{where} has a '{LABEL_COLUMN}' column but no feature columns; add the feature columns")
    text = [str(c) for c in features.columns if not (pd.api.types.is_numeric_dtype(features[c])
                                                     or pd.api.types.is_bool_dtype(features[c]))]
    if text:
        raise DataError(f"{where}: feature columns {_names(text)} are not numeric; encode them as numbers "
                        "(for example one-hot columns) before loading")
    values = features.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        columns = [str(c) for c, b in zip(features.columns, bad.any(axis=0), strict=True) if b]
        raise DataError(f"{where}: {int(bad.any(axis=1).sum())} rows have missing or infinite values (columns "
                        f"{_names(columns)}); fill or remove them before loading: no row is dropped here")
    line = (lambda i: f"line {i + 2}") if fmt == "csv" else (lambda i: f"row {i + 1}")
    labels = check_labels(_label_values(frame[LABEL_COLUMN].tolist(), space, where, line), space, where)
    return TabularSet(values.astype(np.float32), labels, tuple(str(c) for c in features.columns), space.num_classes)


def read_jsonl(path: Path, space: LabelSpace) -> TextSet:
    """One `{"text": str, "label": index or name}` object per line; blank lines are allowed, nothing else."""
    where = f"data-path {path}"
    texts, raw_labels, lines = [], [], []
    try:
        with path.open("r", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: line {number} is not valid JSON ({error.msg}, column {error.colno}); "
                                    "write one JSON object per line") from None
                if not isinstance(row, dict) or "text" not in row or "label" not in row:
                    raise DataError(f"{where}: line {number} is not an object with 'text' and 'label'; "
                                    'write {"text": ..., "label": ...} per line')
                if not isinstance(row["text"], str) or not row["text"].strip():
                    raise DataError(f"{where}: line {number} has an empty or non-string 'text'; every line needs its text")
                texts.append(row["text"])
                raw_labels.append(row["label"])
                lines.append(number)
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text; save it as UTF-8") from None
    if not texts:
        raise DataError(f"{where} holds no lines; export this institution's texts into it")
    labels = check_labels(_label_values(raw_labels, space, where, lambda i: f"line {lines[i]}"), space, where)
    return TextSet(tuple(texts), labels, space.num_classes)


def check_labels(labels: np.ndarray, space: LabelSpace, where: str) -> np.ndarray:
    """Labels as int64, all inside the label space [0, num_classes); else DataError with the range found."""
    labels = np.asarray(labels, dtype=np.int64)
    outside = (labels < 0) | (labels >= space.num_classes)
    if outside.any():
        low, high = int(labels.min()), int(labels.max())
        hint = "; they look 1-based: subtract 1" if low >= 1 and high == space.num_classes else ""
        raise DataError(  # the count, never the labels found: they are values of the private file
            f"{where}: {int(outside.sum())} of {len(labels)} labels lie outside the label space [0, {space.num_classes}) of "
            f"{space.dataset}{hint}; labels must be {space.describe()}"
        )
    return labels


def _label_values(values: list[object], space: LabelSpace, where: str, line: Callable[[int], str]) -> np.ndarray:
    """Class indices of labels given as integers, integral floats, or text (index or label name)."""
    out = np.empty(len(values), dtype=np.int64)
    unknown: list[str] = []
    for i, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or value is None or (isinstance(value, float) and np.isnan(value)):
            raise DataError(f"{where}: {line(i)} has no class label; every row needs one: {space.describe()}")
        if isinstance(value, (int, np.integer)):
            out[i] = int(value)
        elif isinstance(value, (float, np.floating)):
            if not float(value).is_integer():
                raise DataError(f"{where}: {line(i)} has a non-integer label; labels must be {space.describe()}")
            out[i] = int(value)
        elif isinstance(value, str) and (index := space.parse(value)) is not None:
            out[i] = index
        elif isinstance(value, str):
            unknown += [] if value in unknown else [value]
            out[i] = -1
        else:
            raise DataError(f"{where}: {line(i)} has a label of type {type(value).__name__}; labels must be {space.describe()}")
    if unknown:
        raise DataError(f"{where}: {len(unknown)} distinct labels are not classes of {space.dataset}; "
                        f"labels must be {space.describe()}")
    return out


def _image_set(images: np.ndarray, labels: np.ndarray, space: LabelSpace, where: Path) -> ImageSet:
    if len(labels) == 0:
        raise DataError(f"data-path {where} holds no images; export this institution's data into it")
    return ImageSet(np.ascontiguousarray(images, dtype=np.uint8), labels, space.num_classes)


def _check_image_size(found: tuple[int, ...], space: LabelSpace, what: str) -> None:
    if space.image_size is not None and found != space.image_size:
        size = "x".join(str(s) for s in found)
        expected = "x".join(str(s) for s in space.image_size)
        raise DataError(f"{what} {size} pixels (height x width) but the public set's images ({space.dataset}) are "
                        f"{expected}; resize this institution's images to {expected}")


def _normal(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", name.lower()).strip("-")


def _names(items: Sequence[object], limit: int = 5) -> str:
    names = [getattr(item, "name", str(item)) for item in items]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
