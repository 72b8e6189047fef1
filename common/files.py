"""Atomic file writes: a temporary file beside the target, fsync'd, renamed over it, then the folder fsync'd.

A reader sees the old file or the new one, never a torn one, and after a crash the rename is durable:

    atomic_write_text(run_dir / "results.json", text)
    atomic_write_bytes(key_path, pem, mode=0o600)
    with atomic_path(path, suffix=".png") as tmp:  # for writers that open the file themselves
        fig.savefig(tmp)

The temporary file is named `.<name>.<random>.tmp<suffix>` in the target's folder and is removed when
the write fails. Without `mode` the file gets the mode `open()` gives a new file (0666 less the umask).

Files holding records or keys (a run folder's results, ledger, progress, reports, plots and checkpoints; an
institution's release log, privacy ledger and teacher state) are owner-only whatever the umask: written with
`mode=PRIVATE` (0600), appended to through `open_private` / `private_descriptor` (which also tighten a file an
older version left looser), in folders made by `private_folder` (0700):

    private_folder(run_dir, tighten=True)
    atomic_write_text(run_dir / "results.json", text, mode=PRIVATE)
    with open_private(run_dir / "progress.jsonl") as handle:  # appends
        handle.write(line)
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TextIO

PRIVATE = 0o600  # a file holding records or keys: its owner reads and writes it, nobody else
PRIVATE_FOLDER = 0o700  # a folder made for such files


@contextmanager
def atomic_path(path: Path | str, mode: int | None = None, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer to fill; on success put it in place atomically.

    `suffix` ends the temporary name, for writers that choose the format from it (matplotlib, numpy's
    savez); `mode`, when given, is set on the file exactly (the umask does not apply), before the writer
    gets it: a private key is never readable by others, not even half-written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600))
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        if mode is not None:  # again, in case the writer made the file anew
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically (see the module docstring)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str, mode: int | None = None, encoding: str = "utf-8") -> None:
    """Replace `path` with `text`, encoded, atomically (see the module docstring)."""
    atomic_write_bytes(path, text.encode(encoding), mode)


def private_folder(path: Path | str, *, tighten: bool = False) -> Path:
    """Make folder `path` and its missing parents, each created 0700 whatever the umask; return `path`.

    Folders that exist are left as they are, except `path` itself with `tighten` (a folder that is the
    records' own, such as a run folder, which an older version may have made looser).
    """
    path = Path(path)
    missing = []
    folder = path
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_FOLDER)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made meanwhile by another process: its maker chose its mode
        os.chmod(folder, PRIVATE_FOLDER)  # the umask may have taken more than group and others' bits
    if tighten and path not in missing:
        _tighten(path, PRIVATE_FOLDER)
    return path


def private_descriptor(path: Path | str, flags: int) -> int:
    """`os.open(path, flags | O_CREAT)` for a file holding records or keys: a new file is made 0600 whatever the umask,
    and an existing one is tightened to 0600 (PermissionError, saying so, when it belongs to another user)."""
    descriptor = os.open(path, flags | os.O_CREAT, PRIVATE)
    try:
        _tighten(path, PRIVATE, descriptor)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


@contextmanager
def open_private(path: Path | str, mode: Literal["a", "w"] = "a", encoding: str = "utf-8") -> Iterator[TextIO]:
    """Open a text file holding records, owner-only (`private_descriptor`), to append to ("a") or to write anew ("w")."""
    flags = os.O_WRONLY | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    with os.fdopen(private_descriptor(path, flags), mode, encoding=encoding) as handle:
        yield handle


def _tighten(path: Path | str, mode: int, descriptor: int | None = None) -> None:
    """Give file or folder `path` (open as `descriptor`, when given) exactly `mode`, if it has another one."""
    info = os.stat(path) if descriptor is None else os.fstat(descriptor)
    if stat.S_IMODE(info.st_mode) == mode:
        return
    try:
        if descriptor is None:
            os.chmod(path, mode)
        else:
            os.fchmod(descriptor, mode)
    except PermissionError:  # the file name rides apart from the text (errors leaving a node drop it)
        raise PermissionError(errno.EPERM, f"mode {oct(stat.S_IMODE(info.st_mode))} and another user's, so it cannot be made "
                              f"owner-only ({oct(mode)}) as fedstill keeps records and keys; give it to the user that runs "
                              f"fedstill (chown), or move it aside", str(path)) from None


def fsync_folder(folder: Path | str) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync(path: Path) -> None:
    """Flush a file's data to disk, whichever handle wrote it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def files_stamp(path: Path) -> str:
    """A digest of the names, sizes, modification and change times and inodes of the files under `path`: it
    changes when any of them is written, replaced, added or removed (the change time also moves when a
    modification time is set back)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    for file in files:
        info = file.stat()
        digest.update(f"{file}|{info.st_size}|{info.st_mtime_ns}|{info.st_ctime_ns}|{info.st_ino}\n".encode())
    return digest.hexdigest()
