"""An institution's own images are read and checked from its files once, then come from the cache in its node's state
folder (client/site_cache.py) until the files change; node state never holds them."""

from __future__ import annotations

import gzip
import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, RecordDict
from safetensors.numpy import save_file

import client.site as site_module
from client.site_cache import HEADER_KEY, cache_key
from common.config import RunConfig, default_run_config
from common.errors import DataError
from common.files import files_stamp
from common.node_config import NodeConfig
from common.tasks.images import write_idx
from common.tasks.institution_files import LabelSpace

SIDE = 8  # sklearn's digits
SPACE = LabelSpace("digits", "image", 10, tuple(str(i) for i in range(10)), (SIDE, SIDE))


def digits_config(**overrides: Any) -> RunConfig:
    return RunConfig.from_run_config({**default_run_config(), "dataset": "digits", "public-size": 400, "num-clients": 3,
                                      "min-clients": 2, "test-size": 0, "allow-list": "", "sites-dir": "", **overrides})


def sample_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, SIDE, SIDE), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.int64)


def idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    return folder


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every read (and check) of an institution's files by client.site."""
    done: list[Path] = []
    real = site_module.load_institution_data
    monkeypatch.setattr(site_module, "load_institution_data", lambda path, space: done.append(path) or real(path, space))
    return done


def load(folder: Path, state_dir: Path | None, state: RecordDict | None = None) -> np.ndarray:
    node = {"data-path": str(folder), **({"state-dir": str(state_dir)} if state_dir else {})}
    site = site_module.load_site(digits_config(), NodeConfig.from_node_config(node), RecordDict() if state is None else state)
    return np.concatenate([site.private.images.reshape(len(site.private), -1), site.private.labels[:, None]], axis=1)


def test_own_images_come_from_the_cache_until_the_files_change(tmp_path: Path, reads: list[Path]) -> None:
    # Prepare
    folder, state_dir, state = idx_folder(tmp_path / "data", *sample_images(12)), tmp_path / "state", RecordDict()

    # Execute: read, cached, then the files change (same size) and are read again
    first = load(folder, state_dir, state)
    second = load(folder, state_dir, state)
    images, labels = sample_images(12, seed=9)
    idx_folder(folder, images, labels)
    third = load(folder, state_dir, state)

    # Assert: the data is the files' as read, bit for bit; node state holds no arrays; one cache file, owner-only
    assert len(reads) == 2
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(third[:, -1], labels)
    assert not any(isinstance(record, ArrayRecord) for record in state.values())
    [cached] = state_dir.glob("own-data-*.safetensors")
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600 and stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_a_file_changed_and_its_modification_time_set_back_is_read_again(tmp_path: Path, reads: list[Path]) -> None:
    # Prepare: the images file rewritten in place with other pixels, its modification time restored
    folder = idx_folder(tmp_path / "data", *sample_images(12))
    load(folder, tmp_path / "state")
    images_file = folder / "train-images-idx3-ubyte"
    before = images_file.stat()
    other, _ = sample_images(12, seed=5)
    write_idx(images_file, other)
    os.utime(images_file, ns=(before.st_atime_ns, before.st_mtime_ns))

    # Execute
    again = load(folder, tmp_path / "state")

    # Assert
    assert len(reads) == 2
    np.testing.assert_array_equal(again[:, :-1].reshape(-1, SIDE, SIDE), other)


def test_changed_files_that_fail_the_check_are_refused_although_a_cache_exists(tmp_path: Path) -> None:
    # Prepare
    images, labels = sample_images(10)
    folder = idx_folder(tmp_path / "data", images, labels)
    load(folder, tmp_path / "state")
    idx_folder(folder, images, np.r_[labels[:-1], 10])

    # Execute / Assert
    with pytest.raises(DataError, match=r"outside the label space \[0, 10\)"):
        load(folder, tmp_path / "state")


@pytest.mark.parametrize("tamper", ["garbage", "label outside the classes", "other key"])
def test_a_cache_that_does_not_hold_what_the_check_let_through_is_not_used(
    tmp_path: Path, reads: list[Path], tamper: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a cache file where the node would look for this data's
    images, labels = sample_images(10)
    folder, state_dir = idx_folder(tmp_path / "data", images, labels), tmp_path / "state"
    load(folder, state_dir)
    [cached] = state_dir.glob("own-data-*.safetensors")
    key = cache_key(SPACE, folder, files_stamp(folder))
    if tamper == "garbage":
        cached.write_bytes(b"not a safetensors file")
    else:
        bad = np.r_[labels[:-1], 10] if tamper == "label outside the classes" else labels
        save_file({"images": images, "labels": bad}, str(cached),
                  metadata={HEADER_KEY: key if tamper != "other key" else key.replace('"digits"', '"other"')})

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        again = load(folder, state_dir)

    # Assert: the files were read and checked again, and the cache renewed
    assert len(reads) == 2 and "does not match its files: reading them again" in caplog.text
    np.testing.assert_array_equal(again[:, -1], labels)
    assert load(folder, state_dir) is not None and len(reads) == 2


def test_a_node_without_a_state_folder_reads_its_files_every_time_and_writes_nothing(tmp_path: Path, reads: list[Path]) -> None:
    # Prepare
    folder = idx_folder(tmp_path / "data", *sample_images(8))

    # Execute
    load(folder, None)
    load(folder, None)

    # Assert
    assert len(reads) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_cache_key_names_the_label_space_the_files_and_their_stamp(tmp_path: Path) -> None:
    # Prepare
    folder = idx_folder(tmp_path / "data", *sample_images(8))
    other_space = LabelSpace("digits", "image", 10, SPACE.names, (SIDE + 1, SIDE))

    # Execute
    keys = {cache_key(SPACE, folder, files_stamp(folder)), cache_key(other_space, folder, files_stamp(folder)),
            cache_key(SPACE, tmp_path / "elsewhere", files_stamp(folder)), cache_key(SPACE, folder, "0" * 64)}

    # Assert
    assert len(keys) == 4


def test_after_a_query_a_deployed_nodes_state_holds_no_array(tmp_path: Path, server_task: None) -> None:
    # Prepare: a node with its own data folder and a state folder, as `fedstill supernode` runs one
    from flwr.app import Context, Message

    from client.client_app import soft_labels
    from common.messages import SOFT_LABELS_TYPE, SoftLabelQuery
    from common.tasks.registry import load_split
    from common.tasks.samples import public_fingerprint

    cfg = {**default_run_config(), "dataset": "digits", "public-size": 400, "test-size": 0, "teacher-models": "mlp",
           "allow-list": "", "sites-dir": ""}
    node = {"data-path": str(idx_folder(tmp_path / "data", *sample_images(40))), "state-dir": str(tmp_path / "state")}
    context = Context(run_id=5, node_id=3, node_config=node, state=RecordDict(), run_config=cfg)
    public = load_split("digits", "", 400, int(cfg["seed"])).public
    query = SoftLabelQuery(round=1, fingerprint=public_fingerprint(public), temperature=3.0, codec="float16", num_classes=10,
                           sample_ids=np.arange(20, dtype=np.int64), evaluate_teacher=False)
    message = Message(content=query.to_record(), dst_node_id=3, message_type=SOFT_LABELS_TYPE, group_id="1")

    # Execute: two rounds
    for _ in range(2):
        reply = soft_labels(message, context)

    # Assert: no images and no weights travel with node state; they are in the state folder
    assert not reply.has_error()
    assert not any(isinstance(record, ArrayRecord) for record in context.state.values())
    assert {p.name.split("-")[0] for p in (tmp_path / "state").iterdir()} == {"own", "teacher"}


@pytest.mark.parametrize("deployed", [True, False], ids=["state-dir", "no-state-dir"])
def test_a_deployed_node_keeps_the_public_files_decoded_in_its_state_folder(tmp_path: Path, deployed: bool) -> None:
    # Prepare: a compressed Fashion-MNIST look-alike as the public files
    public = tmp_path / "fmnist"
    public.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train-images-idx3-ubyte", 300), ("train-labels-idx1-ubyte", 300), ("t10k-images-idx3-ubyte", 40),
                    ("t10k-labels-idx1-ubyte", 40)):
        write_idx(public / name, rng.integers(0, 256, size=(n, 4, 4)) if "images" in name else rng.integers(0, 10, size=n))
        (public / f"{name}.gz").write_bytes(gzip.compress((public / name).read_bytes()))
        (public / name).unlink()
    cfg = digits_config(dataset="fashion-mnist", **{"data-dir": str(public), "public-size": 100, "min-partition-size": 1})
    node = NodeConfig.from_node_config({"partition-id": 0, **({"state-dir": str(tmp_path / "state")} if deployed else {})})

    # Execute
    site = site_module.load_site(cfg, node, RecordDict())

    # Assert: the four files decoded into the state folder only on a node that has one
    assert len(site.public) == 100
    assert len(list((tmp_path / "state").glob("decoded-*.npy"))) == (4 if deployed else 0)
