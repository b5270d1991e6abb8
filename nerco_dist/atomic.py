"""Atomic file output, so an interrupted run (or a crash of the machine) never leaves a half-written
checkpoint, CSV or PNG behind."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temporary file lives in the same directory so that ``os.replace`` is a rename on one file system;
    missing parent directories are created. The file is flushed to disk before the rename and the directory
    after it, so that after a power loss ``path`` is the old file or the whole new one, not an empty one.
    A place that cannot be written (read-only, full, missing permissions) is an :class:`InputError` naming
    ``path``; a kill leaves the temporary file (``.NAME.XXXXXXXX.tmp``) for the next run to remove.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise InputError(target, f"cannot be written: {err.strerror or err}") from err
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _creation_mode())  # mkstemp makes it 0600: give it the mode a plain open() would
        _fsync(tmp, os.O_RDWR)
        os.replace(tmp, target)
        _sync_directory(target.parent)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise InputError(target, f"cannot be written: {err.strerror or err}") from err
        raise


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable. POSIX only (elsewhere a directory cannot be opened); a file
    system that cannot sync a directory (EINVAL) is let be."""
    if os.name != "posix":
        return
    try:
        _fsync(directory, os.O_RDONLY)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _creation_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: dict, indent: int = 2) -> None:
    """Write a JSON file atomically (non-ASCII kept readable)."""
    write_text(path, json.dumps(payload, indent=indent, ensure_ascii=False) + "\n")
