"""Unit tests of common/tasks/institution_files.py, `fedstill site-data` and client/site.py's use of data-path.

Each format is written by hand under `tmp_path` and read back; every refusal is a DataError whose
message names the problem and its fix.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import RecordDict
from PIL import Image

import client.site as site_module
from client.client_app import check_query
from client.site import Site
from common.config import RunConfig
from common.errors import ConfigError, DataError, FingerprintMismatch, MessageFormatError
from common.messages import SoftLabelQuery
from common.node_config import NodeConfig
from common.tasks.images import write_idx
from common.tasks.institution_files import (
    LabelSpace,
    TabularSet,
    TextSet,
    detect_format,
    image_label_space,
    load_institution_data,
)
from common.tasks.partition import partition_indices
from common.tasks.registry import load_split
from common.tasks.samples import ImageSet, public_fingerprint
from server.exchange import short_reason
from simulations.deploy.site_data import write_site_data

SIDE = 8
IMAGE_SPACE = LabelSpace("digits", "image", 10, tuple(str(i) for i in range(10)), (SIDE, SIDE))
FASHION_SPACE = LabelSpace("fashion-mnist", "image", 10, ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"), (SIDE, SIDE))
TABLE_SPACE = LabelSpace("credit", "tabular", 3, ("low", "medium", "high"))
TEXT_SPACE = LabelSpace("news", "text", 3, ("sport", "politics", "tech"))


def load_site(cfg: RunConfig, node_config: dict[str, Any], state: RecordDict) -> Site:
    """client.site.load_site, after the node config is parsed as the ClientApp parses it."""
    return site_module.load_site(cfg, NodeConfig.from_node_config(node_config), state)


def sample_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, SIDE, SIDE), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.int64)


def idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train", gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        path = folder / f"{prefix}-{kind}-ubyte"
        write_idx(path, array)
        if gz:
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    return folder


def image_folders(folder: Path, images: np.ndarray, labels: np.ndarray, names: Callable[[int], str] = str) -> Path:
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / names(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / names(int(label)) / f"{number:04d}.png")
    return folder


def digits_config(run_config_mapping: dict[str, Any], **overrides: Any) -> RunConfig:
    values = {**run_config_mapping, "dataset": "digits", "public-size": 400, "num-clients": 3, "min-clients": 2,
              "partitioner": "iid", "test-size": 0, "allow-list": "", "sites-dir": ""}
    return RunConfig.from_run_config({**values, **overrides})


# ---------------------------------------------------------------------------------------------------
# Each format loads
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_loads_images_and_labels(tmp_path: Path, gz: bool) -> None:
    # Prepare
    images, labels = sample_images(30)
    folder = idx_folder(tmp_path / "data", images, labels, gz=gz)

    # Execute
    data = load_institution_data(folder, IMAGE_SPACE)

    # Assert
    assert isinstance(data, ImageSet) and data.num_classes == 10
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == np.int64 and data.images.dtype == np.uint8


def test_several_idx_pairs_are_concatenated_in_prefix_order(tmp_path: Path) -> None:
    # Prepare
    first, second = sample_images(5, seed=1), sample_images(7, seed=2)
    folder = idx_folder(tmp_path / "data", *second, prefix="part-b")
    idx_folder(folder, *first, prefix="part-a", gz=True)

    # Execute
    data = load_institution_data(folder, IMAGE_SPACE)

    # Assert
    np.testing.assert_array_equal(data.images, np.concatenate([first[0], second[0]]))
    np.testing.assert_array_equal(data.labels, np.concatenate([first[1], second[1]]))


def test_image_folders_named_by_index_or_label_name_load_in_class_then_file_order(tmp_path: Path) -> None:
    # Prepare: class folders by name ("ankle-boot", "T-shirt top") and by index ("3")
    images, labels = sample_images(20)
    names = {9: "ankle-boot", 0: "T-shirt top"}
    folder = image_folders(tmp_path / "data", images, labels, lambda label: names.get(label, str(label)))

    # Execute
    data = load_institution_data(folder, FASHION_SPACE)

    # Assert: stable order by class, then by file name (= the order written)
    order = np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(data.labels, labels[order])
    np.testing.assert_array_equal(data.images, images[order])


def test_gray_images_saved_as_rgb_are_accepted(tmp_path: Path) -> None:
    # Prepare
    image = np.arange(SIDE * SIDE, dtype=np.uint8).reshape(SIDE, SIDE)
    (tmp_path / "data" / "4").mkdir(parents=True)
    Image.fromarray(np.stack([image] * 3, axis=-1), mode="RGB").save(tmp_path / "data" / "4" / "a.png")

    # Execute
    data = load_institution_data(tmp_path / "data", IMAGE_SPACE)

    # Assert
    np.testing.assert_array_equal(data.images[0], image)
    assert data.labels.tolist() == [4]


def test_csv_and_parquet_give_a_tabular_set(tmp_path: Path) -> None:
    # Prepare: labels as indices in one file, as class names in the other
    frame = pd.DataFrame({"age": [30, 41, 52], "income": [1.5, 2.5, 3.5], "owner": [True, False, True],
                          "label": [0, 2, 1]})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.assign(label=["low", "High", "medium"]).to_parquet(tmp_path / "rows.parquet")

    # Execute
    from_csv = load_institution_data(tmp_path / "rows.csv", TABLE_SPACE)
    from_parquet = load_institution_data(tmp_path / "rows.parquet", TABLE_SPACE)

    # Assert
    for data in (from_csv, from_parquet):
        assert isinstance(data, TabularSet) and data.num_classes == 3
        assert data.feature_names == ("age", "income", "owner")
        assert data.features.dtype == np.float32 and data.features.shape == (3, 3)
        assert data.labels.tolist() == [0, 2, 1]
    np.testing.assert_allclose(from_csv.features[:, 1], [1.5, 2.5, 3.5])


def test_jsonl_gives_a_text_set_and_a_folder_holding_one_file_is_read(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [{"text": "a goal", "label": 0}, {"text": "a vote", "label": "politics", "id": 7}, {"text": "a chip", "label": 2}]
    (folder / "texts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")

    # Execute
    data = load_institution_data(folder, TEXT_SPACE)

    # Assert
    assert isinstance(data, TextSet)
    assert data.texts == ("a goal", "a vote", "a chip") and data.labels.tolist() == [0, 1, 2]


def test_detect_format_names_what_the_path_holds(tmp_path: Path) -> None:
    # Prepare
    idx = idx_folder(tmp_path / "idx", *sample_images(3))
    images = image_folders(tmp_path / "images", *sample_images(3))
    (tmp_path / "t.csv").write_text("label\n1\n")

    # Execute / Assert
    assert detect_format(idx) == ("idx", idx)
    assert detect_format(images) == ("images", images)
    assert detect_format(tmp_path / "t.csv") == ("csv", tmp_path / "t.csv")


# ---------------------------------------------------------------------------------------------------
# Round trip: `fedstill site-data` output reads back as the partition
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["idx", "images"])
def test_site_data_output_reads_back_as_each_partition(tmp_path: Path, run_config_mapping: dict[str, Any], fmt: str) -> None:
    # Prepare
    cfg = digits_config(run_config_mapping, partitioner="dirichlet", **{"dirichlet-alpha": 0.5})
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)

    # Execute
    written, fingerprint = write_site_data(cfg, tmp_path / "sites", fmt)

    # Assert
    assert fingerprint == public_fingerprint(split.public)
    assert [site.name for site in written] == ["institution-0", "institution-1", "institution-2"]
    space = image_label_space(cfg.dataset, split.public)
    for partition_id, site in enumerate(written):
        rows = partition_indices(split.private.labels, 3, partition_id, "dirichlet", alpha=0.5,
                                 min_partition_size=cfg.min_partition_size, seed=cfg.seed)
        part = split.private.subset(rows)
        data = load_institution_data(site.folder, space)
        order = np.arange(len(part)) if fmt == "idx" else np.argsort(part.labels, kind="stable")
        np.testing.assert_array_equal(data.images, part.images[order])
        np.testing.assert_array_equal(data.labels, part.labels[order])
        np.testing.assert_array_equal(site.class_counts, np.bincount(part.labels, minlength=10))


def test_site_data_refuses_to_overwrite_unless_asked(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = digits_config(run_config_mapping)
    write_site_data(cfg, tmp_path, "images")

    # Execute / Assert
    with pytest.raises(DataError, match=r"institution-0/data already holds data .*--overwrite"):
        write_site_data(cfg, tmp_path, "idx")
    written, _ = write_site_data(cfg, tmp_path, "idx", overwrite=True)
    assert sorted(p.name for p in written[0].folder.iterdir()) == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


# ---------------------------------------------------------------------------------------------------
# Every refusal names the problem and the fix
# ---------------------------------------------------------------------------------------------------


def _missing(root: Path) -> Path:
    return root / "nowhere"


def _empty(root: Path) -> Path:
    (root / "data").mkdir()
    return root / "data"


def _unknown(root: Path) -> Path:
    (root / "data").mkdir()
    (root / "data" / "notes.txt").write_text("x")
    return root / "data"


def _unknown_file(root: Path) -> Path:
    (root / "scan.dcm").write_bytes(b"x")
    return root / "scan.dcm"


def _single_idx_file(root: Path) -> Path:
    folder = idx_folder(root / "data", *sample_images(3))
    return folder / "train-images-idx3-ubyte"


def _counts_differ(root: Path) -> Path:
    images, labels = sample_images(10)
    return idx_folder(root / "data", images, labels[:9])


def _no_labels_file(root: Path) -> Path:
    folder = idx_folder(root / "data", *sample_images(3))
    (folder / "train-labels-idx1-ubyte").unlink()
    (folder / "extra-images-idx3-ubyte").write_bytes((folder / "train-images-idx3-ubyte").read_bytes())
    return folder


def _plain_and_gz(root: Path) -> Path:
    folder = idx_folder(root / "data", *sample_images(3))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress((folder / "train-labels-idx1-ubyte").read_bytes()))
    return folder


def _bad_magic(root: Path) -> Path:
    folder = idx_folder(root / "data", *sample_images(3))
    raw = (folder / "train-images-idx3-ubyte").read_bytes()
    (folder / "train-images-idx3-ubyte").write_bytes((1234).to_bytes(4, "big") + raw[4:])
    return folder


def _truncated(root: Path) -> Path:
    folder = idx_folder(root / "data", *sample_images(3))
    raw = (folder / "train-images-idx3-ubyte").read_bytes()
    (folder / "train-images-idx3-ubyte").write_bytes(raw[:-5])
    return folder


def _bad_gzip(root: Path) -> Path:
    folder = idx_folder(root / "data", *sample_images(3), gz=True)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not gzip")
    return folder


def _labels_outside(root: Path) -> Path:
    images, labels = sample_images(10)
    return idx_folder(root / "data", images, np.r_[labels[:-1], 12])


def _labels_one_based(root: Path) -> Path:
    images, _ = sample_images(10)
    return idx_folder(root / "data", images, np.arange(1, 11))


def _wrong_idx_size(root: Path) -> Path:
    return idx_folder(root / "data", np.zeros((4, 28, 28), dtype=np.uint8), np.zeros(4, dtype=np.int64))


def _wrong_png_size(root: Path) -> Path:
    (root / "data" / "1").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8), mode="L").save(root / "data" / "1" / "a.png")
    return root / "data"


def _unknown_class(root: Path) -> Path:
    folder = image_folders(root / "data", *sample_images(3))
    (folder / "cats").mkdir()
    return folder


def _class_folder(root: Path, name: str) -> Path:
    folder = image_folders(root / "data", *sample_images(3))
    (folder / name).mkdir()
    return folder


def _class_outside(root: Path) -> Path:
    folder = image_folders(root / "data", *sample_images(3))
    (folder / "10").mkdir()
    return folder


def _same_class_twice(root: Path) -> Path:
    images, _ = sample_images(2)
    return image_folders(root / "data", images, np.array([0, 1]), lambda label: ["0", "t-shirt-top"][label])


def _empty_class(root: Path) -> Path:
    folder = image_folders(root / "data", *sample_images(3))
    (folder / "7").mkdir(exist_ok=True)
    for file in (folder / "7").iterdir():
        file.unlink()
    return folder


def _stray_file_in_class(root: Path) -> Path:
    images, _ = sample_images(2)
    folder = image_folders(root / "data", images, np.array([2, 2]))
    (folder / "2" / "notes.txt").write_text("x")
    return folder


def _stray_file_beside_classes(root: Path) -> Path:
    folder = image_folders(root / "data", *sample_images(3))
    (folder / "labels.csv").write_text("x")
    return folder


def _corrupt_png(root: Path) -> Path:
    folder = image_folders(root / "data", *sample_images(3))
    next((folder).rglob("*.png")).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


def _colour_png(root: Path) -> Path:
    (root / "data" / "5").mkdir(parents=True)
    pixels = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    Image.fromarray(pixels, mode="RGB").save(root / "data" / "5" / "a.png")
    return root / "data"


def _sixteen_bit_png(root: Path) -> Path:
    (root / "data" / "5").mkdir(parents=True)
    Image.fromarray(np.zeros((SIDE, SIDE), dtype=np.uint16)).save(root / "data" / "5" / "a.png")
    return root / "data"


def _csv_for_images(root: Path) -> Path:
    (root / "rows.csv").write_text("x,label\n1,0\n")
    return root / "rows.csv"


def _jsonl_for_images(root: Path) -> Path:
    (root / "data").mkdir()
    (root / "data" / "t.jsonl").write_text('{"text": "a", "label": 0}\n')
    return root / "data"


IMAGE_ERRORS = [
    (_missing, r"data-path .*nowhere does not exist", r"absolute path .*idx files"),
    (_empty, r"data-path .*data is an empty folder", r"put this institution's data there"),
    (_unknown, r"holds no data in a known format \(found 'notes.txt'\)", r"accepted: a folder of idx"),
    (_unknown_file, r"scan.dcm is a file of unknown format \(.dcm\)", r"accepted: a folder of idx files"),
    (_single_idx_file, r"is a single idx file", r"point data-path at the folder"),
    (_counts_differ, r"holds 10 images but train-labels-idx1-ubyte holds 9 labels", r"export the two files together"),
    (_no_labels_file, r"extra-images-idx3-ubyte has no matching extra-labels-idx1-ubyte", r"each images file needs its labels"),
    (_plain_and_gz, r"holds both train-labels-idx1-ubyte and train-labels-idx1-ubyte.gz", r"keep one of them"),
    (_bad_magic, r"is not an idx file \(magic number 1234\)", r"export the file again"),
    (_truncated, r"holds \d+ bytes but its header \(3, 8, 8\) needs \d+: the file is truncated", r"export the file again"),
    (_bad_gzip, r"cannot read .*train-labels-idx1-ubyte.gz", r"export the file again"),
    (_labels_outside, r"1 of 10 labels lie outside the label space \[0, 10\) of digits; labels must",
     r"labels must be class indices 0..9"),
    (_labels_one_based, r"1 of 10 labels lie outside .* of digits; they look 1-based", r"look 1-based: subtract 1"),
    (_wrong_idx_size, r"the images in train-images-idx3-ubyte are 28x28 pixels .* are 8x8", r"resize .* to 8x8"),
    (_wrong_png_size, r"image .*a.png is 32x32 pixels .*public set's images \(digits\) are 8x8", r"resize .* to 8x8"),
    (_unknown_class, r"1 class folders are not classes of digits", r"name class folders by class indices 0..9"),
    (_class_outside, r"1 class folders lie outside the label space \[0, 10\)", r"name class folders by"),
    (_same_class_twice, r"class folders '0' and 't-shirt-top' both name class 0", r"merge them"),
    (_empty_class, r"class folder '7' holds no images", r"add its images or remove it"),
    (_stray_file_in_class, r"class folder '2' holds 'notes.txt', which are not PNG or JPEG", r"remove them or convert"),
    (_stray_file_beside_classes, r"holds class folders and also the files 'labels.csv'", r"move those files"),
    (_corrupt_png, r"cannot read image .*\.png \(UnidentifiedImageError\); the file is corrupt", r"export it again or remove"),
    (_colour_png, r"image .*a.png is in colour", r"convert it to 8-bit grayscale"),
    (_sixteen_bit_png, r"has pixel mode I;16", r"save it as 8-bit grayscale, mode L"),
    (_csv_for_images, r"holds tabular CSV data but scenario dataset .* is an image task",
     r"point data-path at a folder of idx files .* or of per-class image folders, <data-path>/<class>/\*.png$"),
    (_jsonl_for_images, r"holds text JSONL data but scenario dataset .* is an image task", r"point data-path at a folder"),
]


@pytest.mark.parametrize(("make", "problem", "fix"), IMAGE_ERRORS, ids=[m.__name__.strip("_") for m, _, _ in IMAGE_ERRORS])
def test_bad_image_data_is_refused_with_the_problem_and_the_fix(tmp_path: Path, make, problem: str, fix: str) -> None:
    # Prepare
    path = make(tmp_path)
    space = FASHION_SPACE if make is _same_class_twice else IMAGE_SPACE

    # Execute
    with pytest.raises(DataError) as caught:
        load_institution_data(path, space)

    # Assert
    message = str(caught.value)
    assert re.search(problem, message), message
    assert re.search(fix, message), message
    assert_reaches_the_server_whole(message)


def test_an_unreadable_folder_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the node's user may not list the folder (a stand-in for chmod, which root ignores)
    folder = idx_folder(tmp_path / "data", *sample_images(3))

    def refuse(self: Path):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)

    # Execute / Assert
    with pytest.raises(DataError, match=r"cannot read .*data \(Permission denied\); make data-path readable by the user"):
        load_institution_data(folder, IMAGE_SPACE)


def test_the_image_task_refusal_reads_as_documented(tmp_path: Path) -> None:
    # Prepare
    space = LabelSpace("fashion-mnist", "image", 10, (), (28, 28))

    # Execute
    with pytest.raises(DataError) as caught:
        load_institution_data(_csv_for_images(tmp_path), space)

    # Assert
    assert "holds tabular CSV data but scenario dataset fashion-mnist is an image task" in str(caught.value)


def _write(name: str, text: str) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        (root / name).write_text(text, encoding="utf-8")
        return root / name

    make.__name__ = name
    return make


def _parquet_with_gaps(root: Path) -> Path:
    pd.DataFrame({"x": [1.0, None, 3.0], "y": [1.0, 2.0, 3.0], "label": [0, 1, 2]}).to_parquet(root / "gaps.parquet")
    return root / "gaps.parquet"


TABLE_ERRORS = [
    (_write("no-label.csv", "a,b\n1,2\n"), r"has no 'label' column \(columns: 'a', 'b'\)", r"rename the column holding the class to label"),
    (_write("empty.csv", "a,label\n"), r"holds no rows", r"export this institution's data"),
    (_write("only-label.csv", "label\n1\n"), r"no feature columns", r"add the feature columns"),
    (_write("text-feature.csv", "city,label\nParis,0\n"), r"feature columns 'city' are not numeric", r"encode them"),
    (_write("float-label.csv", "x,label\n1,0\n2,1.5\n"), r"line 3 has a non-integer label", r"class indices 0..2 or label names"),
    (_write("missing-label.csv", "x,label\n1,0\n2,\n"), r"line 3 has no class label", r"every row needs one"),
    (_write("unknown-name.csv", "x,label\n1,low\n2,giant\n"), r"1 distinct labels are not classes of credit",
     r"or label names: low, medium, high$"),
    (_write("outside.csv", "x,label\n1,0\n2,3\n"), r"1 of 2 labels lie outside the label space \[0, 3\)", r"labels must be"),
    (_write("negative.csv", "x,label\n1,-1\n"), r"1 of 1 labels lie outside the label space \[0, 3\) of credit;",
     r"labels must be"),
    (_parquet_with_gaps, r"1 rows have missing or infinite values \(columns 'x'\)", r"fill or remove them"),
    (_write("broken.parquet", "not parquet"), r"cannot read .*broken.parquet as PARQUET", r"export it again"),
    (_write("images.jsonl", '{"text": "a", "label": 0}\n'), r"holds text JSONL data but scenario dataset credit is a tabular task",
     r"a CSV or Parquet file"),
]

TEXT_ERRORS = [
    (_write("bad.jsonl", '{"text": "a", "label": 0}\n{"text": "b", label: 1}\n'), r"line 2 is not valid JSON",
     r"one JSON object per line"),
    (_write("keys.jsonl", '{"text": "a", "label": 0}\n{"body": "b", "label": 1}\n'), r"line 2 is not an object with 'text' and 'label'",
     r'write \{"text": ..., "label": ...\}'),
    (_write("empty-text.jsonl", '{"text": " ", "label": 0}\n'), r"line 1 has an empty or non-string 'text'", r"needs its text"),
    (_write("names.jsonl", '{"text": "a", "label": "weather"}\n'), r"1 distinct labels are not classes of news", r"sport, politics, tech"),
    (_write("float.jsonl", '{"text": "a", "label": 0.5}\n'), r"line 1 has a non-integer label", r"class indices 0..2"),
    (_write("list.jsonl", '{"text": "a", "label": [1]}\n'), r"line 1 has a label of type list", r"class indices 0..2"),
    (_write("blank.jsonl", "\n\n"), r"holds no lines", r"export this institution's texts"),
    (_write("rows.csv", "x,label\n1,0\n"), r"holds tabular CSV data but scenario dataset news is a text task", r"a JSONL file"),
]


@pytest.mark.parametrize(("make", "problem", "fix"), TABLE_ERRORS, ids=[m.__name__ for m, _, _ in TABLE_ERRORS])
def test_bad_tables_are_refused_with_the_problem_and_the_fix(tmp_path: Path, make, problem: str, fix: str) -> None:
    _assert_refused(make(tmp_path), TABLE_SPACE, problem, fix)


@pytest.mark.parametrize(("make", "problem", "fix"), TEXT_ERRORS, ids=[m.__name__ for m, _, _ in TEXT_ERRORS])
def test_bad_texts_are_refused_with_the_problem_and_the_fix(tmp_path: Path, make, problem: str, fix: str) -> None:
    _assert_refused(make(tmp_path), TEXT_SPACE, problem, fix)


def _assert_refused(path: Path, space: LabelSpace, problem: str, fix: str) -> None:
    with pytest.raises(DataError) as caught:
        load_institution_data(path, space)
    assert re.search(problem, str(caught.value)), str(caught.value)
    assert re.search(fix, str(caught.value)), str(caught.value)
    assert_reaches_the_server_whole(str(caught.value))


def assert_reaches_the_server_whole(message: str) -> None:
    """The server keeps a node error's own message (server/exchange.py, short_reason): nothing of it may be cut."""
    framed = f"<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: {message}'>"
    assert short_reason(framed) == " ".join(message.split())


def test_no_message_carries_values_read_from_the_file(tmp_path: Path) -> None:
    # Prepare: a secret in a feature, a label and a text: refusals name lines and columns, not values
    secret = "PATIENT-4711"
    cases = [
        (_write("a.csv", f"x,label\n{secret},0\n")(tmp_path), TABLE_SPACE),
        (_write("b.jsonl", f'{{"text": "{secret}", "label": 0.5}}\n')(tmp_path), TEXT_SPACE),
        (_write("c.jsonl", f'{{"text": "{secret}", "label": 0}}\n{{"text": "{secret}" label}}\n')(tmp_path), TEXT_SPACE),
        (_write("d.csv", f"x,label\n1,0\n2,{secret}\n")(tmp_path), TABLE_SPACE),  # a label that is no class
        (_write("e.jsonl", f'{{"text": "a", "label": "{secret}"}}\n')(tmp_path), TEXT_SPACE),
        (_write("f.csv", "x,label\n1,0\n2,4711\n")(tmp_path), TABLE_SPACE),  # a label outside the label space
        (_class_folder(tmp_path / "g", secret), IMAGE_SPACE),  # a class folder that names no class
    ]

    for path, space in cases:
        # Execute
        with pytest.raises(DataError) as caught:
            load_institution_data(path, space)

        # Assert
        assert secret not in str(caught.value) and "4711" not in str(caught.value), str(caught.value)


# ---------------------------------------------------------------------------------------------------
# client/site.py: data-path, sites-dir data folders, public-dir, the cache, and the server's checks
# ---------------------------------------------------------------------------------------------------


def test_a_node_with_data_path_trains_on_its_own_data(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = digits_config(run_config_mapping)
    images, labels = sample_images(25)
    folder = idx_folder(tmp_path / "data", images, labels)

    # Execute
    site = load_site(cfg, {"data-path": str(folder)}, RecordDict())

    # Assert
    np.testing.assert_array_equal(site.private.images, images)
    np.testing.assert_array_equal(site.private.labels, labels)
    assert site.partition_id == 0 and len(site.public) == 400
    assert site.fingerprint == public_fingerprint(load_split("digits", "", 400, cfg.seed, 0).public)


def test_data_path_overrides_the_partition(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = digits_config(run_config_mapping)
    images, labels = sample_images(11)

    # Execute
    site = load_site(cfg, {"data-path": str(idx_folder(tmp_path / "d", images, labels)), "partition-id": 2,
                           "num-partitions": 3}, RecordDict())

    # Assert: its own 11 samples, and partition-id still picks the teacher
    assert len(site.private) == 11 and site.partition_id == 2


def test_a_simulated_institution_reads_its_data_folder_in_sites_dir(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare: only institution 1 has a data folder
    cfg = digits_config(run_config_mapping, **{"sites-dir": str(tmp_path)})
    images, labels = sample_images(9)
    idx_folder(tmp_path / "institution-1" / "data", images, labels)

    # Execute
    own = load_site(cfg, {"partition-id": 1, "num-partitions": 3}, RecordDict())
    pooled = load_site(cfg, {"partition-id": 0, "num-partitions": 3}, RecordDict())

    # Assert
    np.testing.assert_array_equal(own.private.images, images)
    assert len(pooled.private) > 300  # a third of the private pool


def test_public_dir_overrides_data_dir_and_a_wrong_public_set_is_refused(
    tmp_path: Path, run_config_mapping: dict[str, Any],
) -> None:
    # Prepare: a small Fashion-MNIST-shaped folder; the run's data-dir points nowhere
    public = tmp_path / "fmnist"
    for prefix, n, seed in (("train", 300, 1), ("t10k", 40, 2)):
        idx_folder(public, *sample_images(n, seed), prefix=prefix, gz=True)
    cfg = RunConfig.from_run_config({**run_config_mapping, "dataset": "fashion-mnist", "data-dir": str(tmp_path / "none"),
                                     "public-size": 100, "test-size": 0, "allow-list": "", "sites-dir": ""})
    own = idx_folder(tmp_path / "data", *sample_images(20, 3))
    node = {"data-path": str(own), "public-dir": str(public)}

    # Execute
    site = load_site(cfg, node, RecordDict())
    with pytest.raises(DataError, match=r"Fashion-MNIST folder .*none does not exist"):
        load_site(cfg, {"data-path": str(own)}, RecordDict())

    # Assert: the server's query about another public set is refused, naming both fingerprints and the fix
    query = SoftLabelQuery(1, "f" * 64, 2.0, "float16", 10, np.arange(5, dtype=np.int64), False)
    with pytest.raises(FingerprintMismatch, match=r"public set fingerprint mismatch: server has ffffffffffff\.\.\..*public-dir") as caught:
        check_query(query, site.fingerprint, site.private.num_classes, len(site.public))
    assert_reaches_the_server_whole(str(caught.value))
    right = SoftLabelQuery(1, site.fingerprint, 2.0, "float16", 10, np.arange(5, dtype=np.int64), False)
    check_query(right, site.fingerprint, site.private.num_classes, len(site.public))


def test_label_space_mismatches_are_refused(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = digits_config(run_config_mapping)
    images, labels = sample_images(10)
    wrong = idx_folder(tmp_path / "wrong", images, np.r_[labels[:-1], 10])
    site = load_site(cfg, {"data-path": str(idx_folder(tmp_path / "ok", images, labels))}, RecordDict())
    query = SoftLabelQuery(1, site.fingerprint, 2.0, "float16", 5, np.arange(5, dtype=np.int64), False)

    # Execute / Assert: labels outside the scenario's classes, and a server with another label space
    with pytest.raises(DataError, match=r"outside the label space \[0, 10\) of digits"):
        load_site(cfg, {"data-path": str(wrong)}, RecordDict())
    with pytest.raises(MessageFormatError, match="label space mismatch: server expects 5 classes, this node has 10") as caught:
        check_query(query, site.fingerprint, site.private.num_classes, len(site.public))
    assert_reaches_the_server_whole(str(caught.value))


@pytest.mark.parametrize(("node", "message"), [
    ({"data-path": 3}, r"data-path must be a path \(a string\), got 3"),
    ({"data-path": ""}, r"data-path must be a path"),
    ({"data-path": "/x", "public-dir": 1}, r"public-dir must be a folder path"),
    ({}, r"needs a 'data-path' to this institution's data .*partition-id"),
])
def test_bad_node_config_is_a_config_error(run_config_mapping: dict[str, Any], node: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_site(digits_config(run_config_mapping), node, RecordDict())


def test_a_data_error_reaches_the_server_without_the_local_path_and_the_node_logs_it(
    tmp_path: Path, run_config_mapping: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: labels outside the scenario's classes, in a folder whose path names the institution
    cfg = digits_config(run_config_mapping)
    images, labels = sample_images(10)
    wrong = idx_folder(tmp_path / "st-mary-hospital" / "exports", images, np.r_[labels[:-1], 10])

    # Execute
    with caplog.at_level(logging.ERROR, logger="flwr"), pytest.raises(DataError) as caught:
        load_site(cfg, {"data-path": str(wrong)}, RecordDict())

    # Assert: the text the server reads names data-path and the count; the node's own log has the path
    message = str(caught.value)
    assert "st-mary-hospital" not in message and str(tmp_path) not in message, message
    assert re.match(r"data-path: 1 of 10 labels lie outside the label space \[0, 10\) of digits; .*; this node's log names "
                    r"the path$", message), message
    assert_reaches_the_server_whole(message)
    assert any(str(wrong) in record.getMessage() for record in caplog.records)


def test_every_form_of_a_local_path_is_replaced_by_its_key() -> None:
    # Prepare
    paths = {"/srv/hospital/data": "data-path", "/srv/hospital/data/public": "public-dir", "/home/op": "~"}
    error = DataError("data-path /srv/hospital/data/x.csv: line 3 has no class label; Fashion-MNIST folder "
                      "/srv/hospital/data/public/fm does not exist; see /home/op/notes")

    # Execute
    kept = site_module.kept_local(error, paths)

    # Assert
    assert isinstance(kept, DataError)
    assert str(kept) == ("data-path/x.csv: line 3 has no class label; Fashion-MNIST folder public-dir/fm does not exist; "
                         "see ~/notes; this node's log names the path")
    assert site_module.kept_local(DataError("no path here"), paths).args == ("no path here",)
