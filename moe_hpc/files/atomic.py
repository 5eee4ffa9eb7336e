"""The one way this project writes a file: into ``<path>.tmp``, then renamed over ``path``.

A reader (or a resumed run) therefore only ever sees a complete file at ``path``.  ``durable``
also fsyncs the file before the rename and the directory after it, so the rename survives a
crash too: progress records and outputs need that; a bench JSON does not, and skips the cost.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from ..config.errors import OutputError


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    """Before writing a new file: a complete one at ``path`` is never replaced unasked, and its
    directory must exist (one error naming the path)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: directory {path.parent} does not exist")


def tmp_path_for(path: str | Path) -> Path:
    """Where ``path`` is written before it appears: ``<path>.tmp`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') bytes to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | Path, path: str | Path, durable: bool = True) -> None:
    """Rename a finished ``tmp`` over ``path``; with ``durable``, fsync around the rename."""
    if durable:
        fsync_path(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_path(Path(path).resolve().parent)


@contextmanager
def atomic_path(path: str | Path, durable: bool = True):
    """``with atomic_path(p) as tmp:`` write ``tmp``; it becomes ``p`` when the block ends
    normally and is removed when it raises (a signal or a full disk leaves no half file)."""
    tmp = tmp_path_for(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path, durable)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    """A small text file (JSON, a table, a DOT graph), all or nothing."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)


__all__ = ["refuse_existing", "tmp_path_for", "fsync_path", "publish", "atomic_path", "write_text_atomic"]
