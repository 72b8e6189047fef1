"""Unit tests of common/files.py: the one atomic-write helper (content, replacement, clean-up, mode, fsync)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common import files
from common.files import atomic_path, atomic_write_bytes, atomic_write_text


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
