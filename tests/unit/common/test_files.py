"""Unit tests of common/files.py: the one atomic-write helper (content, replacement, clean-up, mode, fsync), and the
owner-only files and folders that hold records (appends, folders, tightening)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common import files
from common.files import (
    PRIVATE,
    PRIVATE_FOLDER,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    open_private,
    private_descriptor,
    private_folder,
)


def leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


def test_bytes_and_text_are_written_whole(tmp_path: Path) -> None:
    # Execute
    atomic_write_bytes(tmp_path / "data.bin", b"\x00\x01payload")
    atomic_write_text(tmp_path / "page.md", "héllo\nworld\n")

    # Assert
    assert (tmp_path / "data.bin").read_bytes() == b"\x00\x01payload"
    assert (tmp_path / "page.md").read_bytes() == "héllo\nworld\n".encode()
    assert leftovers(tmp_path) == []


def test_an_existing_file_is_replaced_whole(tmp_path: Path) -> None:
    # Prepare: a longer file, so a write in place would leave its tail behind
    path = tmp_path / "results.json"
    path.write_text("x" * 1000, encoding="utf-8")
    inode = path.stat().st_ino

    # Execute
    atomic_write_text(path, "{}\n")

    # Assert: new content only, and a new file (renamed over the old one, not rewritten in place)
    assert path.read_text(encoding="utf-8") == "{}\n"
    assert path.stat().st_ino != inode
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "student.safetensors"
    path.write_bytes(b"old")

    # Execute: the writer fails half-way through
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk on fire")

    # Assert
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_write_into_a_missing_folder_fails_and_leaves_nothing(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "absent" / "report.md", "text")
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_sits_beside_the_target_and_keeps_a_requested_suffix(tmp_path: Path) -> None:
    # Execute
    with atomic_path(tmp_path / "accuracy.png", suffix=".png") as tmp:
        seen = tmp
        tmp.write_bytes(b"png")

    # Assert: hidden, in the same folder (so the rename stays on one file system), ending in the suffix
    assert seen.parent == tmp_path and seen.name.startswith(".accuracy.png.") and seen.name.endswith(".tmp.png")
    assert (tmp_path / "accuracy.png").read_bytes() == b"png" and not seen.exists()


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_mode_is_set_exactly(tmp_path: Path, mode: int) -> None:
    # Prepare: an existing file with another mode, and a umask that would narrow 0644
    path = tmp_path / "ca.key"
    path.write_bytes(b"old")
    path.chmod(0o640)
    previous = os.umask(0o077)

    # Execute
    try:
        atomic_write_bytes(path, b"secret", mode=mode)
    finally:
        os.umask(previous)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_bytes() == b"secret"


def test_without_mode_the_umask_decides_as_for_open(tmp_path: Path) -> None:
    # Prepare
    previous = os.umask(0o027)

    # Execute
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)

    # Assert
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)


def test_the_file_and_then_its_folder_are_fsynced_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record fsync and replace calls, by what they touch
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        calls.append("fsync folder" if target.is_dir() else "fsync file")
        real_fsync(descriptor)

    def replace(source: str | Path, destination: str | Path) -> None:
        calls.append("replace")
        real_replace(source, destination)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a descriptor's file")
    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)

    # Execute
    atomic_write_bytes(tmp_path / "checkpoint.safetensors", b"tensors")

    # Assert
    assert calls == ["fsync file", "replace", "fsync folder"]


def test_a_private_file_is_private_before_its_first_byte(tmp_path: Path) -> None:
    # Prepare: a permissive umask
    previous = os.umask(0o000)

    # Execute: look at the temporary file as the writer receives it
    try:
        with atomic_path(tmp_path / "node.key", mode=0o600) as tmp:
            seen = stat.S_IMODE(tmp.stat().st_mode)
            tmp.write_bytes(b"key")
    finally:
        os.umask(previous)

    # Assert
    assert seen == 0o600 and stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("loose_umask")
def test_appends_go_to_an_owner_only_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "progress.jsonl"

    # Execute
    for line in ("one", "two"):
        with open_private(path) as handle:
            handle.write(line + "\n")

    # Assert
    assert path.read_text(encoding="utf-8") == "one\ntwo\n" and mode_of(path) == PRIVATE


@pytest.mark.usefixtures("loose_umask")
def test_a_file_an_older_version_left_readable_is_tightened_on_the_next_write(tmp_path: Path) -> None:
    # Prepare: a log and a file to rewrite, both world-readable
    log, rewritten = tmp_path / "ledger.jsonl", tmp_path / "flwr.log"
    for path in (log, rewritten):
        path.write_text("old\n", encoding="utf-8")
        path.chmod(0o644)

    # Execute
    os.close(private_descriptor(log, os.O_RDWR))
    with open_private(rewritten, "w") as handle:
        handle.write("new\n")

    # Assert: modes tightened, contents as written (appended to, or replaced)
    assert mode_of(log) == PRIVATE and log.read_text(encoding="utf-8") == "old\n"
    assert mode_of(rewritten) == PRIVATE and rewritten.read_text(encoding="utf-8") == "new\n"


@pytest.mark.usefixtures("loose_umask")
def test_private_folder_makes_every_missing_folder_owner_only_and_leaves_existing_ones(tmp_path: Path) -> None:
    # Prepare: an existing, shared parent
    shared = tmp_path / "runs"
    shared.mkdir(mode=0o755)

    # Execute
    made = private_folder(shared / "study" / "run-1")

    # Assert
    assert made == shared / "study" / "run-1" and made.is_dir()
    assert mode_of(shared / "study") == PRIVATE_FOLDER and mode_of(made) == PRIVATE_FOLDER
    assert mode_of(shared) == 0o755


@pytest.mark.usefixtures("loose_umask")
def test_private_folder_tightens_an_existing_folder_only_when_asked(tmp_path: Path) -> None:
    # Prepare
    kept, tightened = tmp_path / "state", tmp_path / "run"
    for folder in (kept, tightened):
        folder.mkdir(mode=0o755)

    # Execute
    private_folder(kept)
    private_folder(tightened, tighten=True)

    # Assert
    assert mode_of(kept) == 0o755 and mode_of(tightened) == PRIVATE_FOLDER


def test_private_folder_refuses_a_file_in_its_way(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "runs").write_text("not a folder", encoding="utf-8")

    # Execute / Assert
    with pytest.raises(FileExistsError):
        private_folder(tmp_path / "runs" / "run-1")


@pytest.mark.usefixtures("loose_umask")
def test_a_record_of_another_user_that_cannot_be_tightened_is_refused_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a world-readable log whose mode this user may not change (as when another user owns it)
    path = tmp_path / "release-log.jsonl"
    path.write_text("", encoding="utf-8")
    path.chmod(0o644)

    def refuse(descriptor: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(files.os, "fchmod", refuse)

    # Execute / Assert: the reason and the fix, the file name apart (errors leaving a node drop it)
    with pytest.raises(PermissionError) as refused:
        private_descriptor(path, os.O_RDWR)
    assert refused.value.strerror == ("mode 0o644 and another user's, so it cannot be made owner-only (0o600) as fedstill "
                                      "keeps records and keys; give it to the user that runs fedstill (chown), or move it aside")
    assert refused.value.filename == str(path)
