"""Atomic file writes: a temporary file beside the target, fsync'd, renamed over it, then the folder fsync'd.

A reader sees the old file or the new one, never a torn one, and after a crash the rename is durable:

    atomic_write_text(run_dir / "results.json", text)
    atomic_write_bytes(key_path, pem, mode=0o600)
    with atomic_path(path, suffix=".png") as tmp:  # for writers that open the file themselves
        fig.savefig(tmp)

The temporary file is named `.<name>.<random>.tmp<suffix>` in the target's folder and is removed when
the write fails. Without `mode` the file gets the mode `open()` gives a new file (0666 less the umask).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
