"""One job per output: an exclusive lock on ``<output>.lock``, held for the job's whole life.

Two jobs on one output would write into each other's ``<output>.tmp`` (the second one
"resuming" the first's live file, or ``--restart`` replacing it mid-run).  The first job takes
``flock`` on the lock file and writes its holder record (host, pid, start time) into it; a second
job's ``flock`` fails at once and its error names that holder.  The kernel drops the lock when the
holder dies, however it dies, so a stale lock file never blocks a rerun.

Some shared file systems have no ``flock`` (``ENOLCK``, ``EOPNOTSUPP``).  There the record alone
is the lock: a record naming a live process counts as held; one whose process is gone (checked
on the same host) is taken over.  A record from another host cannot be checked from here and
counts as held; the error says to remove the file if that job is known to be over.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from ..config.errors import OutputError

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".lock")


def holder_record() -> str:
    """This process as a lock holder: ``host pid start-time``."""
    return f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"


def _describe(record: str) -> str:
    parts = record.split()
    if len(parts) < 2:
        return "an unknown process"
    return f"host {parts[0]}, pid {parts[1]}" + (f", since {parts[2]}" if len(parts) > 2 else "")


def _alive(record: str) -> bool:
    """Does the record's process still run? Another host's cannot be checked: assume it does."""
    parts = record.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return False
    if parts[0] != socket.gethostname():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record_of(fd: int) -> str:
    """The holder record in an open lock file (a short text line)."""
    return os.pread(fd, 512, 0).decode(errors="replace")


def _held_error(output: Path, record: str, checked_by_record: bool = False) -> OutputError:
    path = lock_path_for(output)
    hint = (f"; if that job is known to be over, remove {path}" if checked_by_record else "")
    return OutputError(f"{output}: another job is writing this output ({_describe(record)}; lock "
                       f"{path}); wait for it to end or choose another --output{hint}")


def check_not_held(output: str | Path) -> None:
    """The dry run's look at the lock: raises the run's own OutputError when a live job holds
    it. It creates nothing, and holds a shared lock only for the instant of the test."""
    output = Path(output)
    try:
        fd = os.open(lock_path_for(output), os.O_RDONLY)
    except OSError:                # no lock file (or none readable): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _held_error(output, _record_of(fd)) from None
    except OSError as exc:
        record = _record_of(fd)
        if exc.errno in NO_FLOCK and _alive(record):
            raise _held_error(output, record, checked_by_record=True) from None
    finally:
        os.close(fd)


class OutputLock:
    """``OutputLock(output)`` holds the lock (or raises OutputError naming the holder) until
    ``release()``; use it as a context manager or release it in a ``finally``."""

    def __init__(self, output: str | Path):
        self.output, self.path = Path(output), lock_path_for(output)
        self.fd = None
        while self.fd is None:
            self.fd = self._take()

    def _take(self) -> int | None:
        """The fd of the lock file, locked; None when it was replaced under us (try again)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the output's lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _record_of(fd)
            os.close(fd)
            raise _held_error(self.output, record) from None
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                os.close(fd)
                raise OutputError(f"{self.path}: cannot lock the output ({exc.strerror})") from None
            record = _record_of(fd)
            if _alive(record):
                os.close(fd)
                raise _held_error(self.output, record, checked_by_record=True) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:          # the holder removed the file between our open and our lock
            os.close(fd)
            return None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_record().encode(), 0)
        except OSError as exc:        # a full disk or quota: one error line, the fd not leaked
            os.close(fd)
            raise OutputError(f"{self.path}: cannot write the lock record ({exc.strerror})") from None
        return fd

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a waiting job then finds a fresh file)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["OutputLock", "check_not_held", "lock_path_for", "holder_record"]
