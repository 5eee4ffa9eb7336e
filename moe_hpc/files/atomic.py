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


def check_output(path: str | Path, overwrite: bool = False, inputs=(), beside=()) -> None:
    """Before any work: ``path``, its ``.tmp`` and the files ``beside`` it may be written.

    Refused, one error naming the path: a path that is one of ``inputs`` (the job's input files
    and its other outputs; through a link or any other spelling; a folder among them stands for
    every file in it), an existing path
    that is not a regular file (a directory, a device such as /dev/null, a FIFO), a complete
    file without ``overwrite``, and a directory that is missing or not writable.
    """
    path = Path(path)
    for written in (path, tmp_path_for(path), *map(Path, beside)):
        source = _same_file_among(written, inputs)
        if source is not None:
            raise OutputError(f"{written}: is the same file as {source}, which this job reads (or also "
                              "writes); an output never replaces an input: choose another output path")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
            raise OutputError(f"{path}: output path is {kind}; refusing to replace it")
        if not overwrite:
            raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: output directory {parent} is not writable")


def _same_file_among(path: Path, inputs) -> Path | None:
    """The one of ``inputs`` that ``path`` is, spelled any way or linked (a folder among them:
    any file in it), or None."""
    for source in map(Path, inputs):
        if path.resolve() == source.resolve():
            return source
        if not path.exists():
            continue
        try:
            candidates = sorted(source.iterdir()) if source.is_dir() else [source]
        except OSError:            # an unreadable input is reported by its reader, not here
            continue
        for candidate in candidates:
            try:
                if os.path.samefile(path, candidate):
                    return candidate
            except OSError:
                continue
    return None


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
    """A small text file (JSON, a table, a DOT graph), all or nothing, in UTF-8 whatever the locale."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


__all__ = ["check_output", "tmp_path_for", "fsync_path", "publish", "atomic_path", "write_text_atomic"]
