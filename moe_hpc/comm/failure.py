"""Turning one rank's problem into a clean exit of every rank, without an MPI hang.

Steps that can fail on some ranks only (reading a file, writing a chunk) run inside
``collective(comm, fn)``: every rank finishes the step, then all agree on the outcome with one
small allgather.  If any rank failed, every rank raises: the lowest failing rank its own error
(which the CLI prints as the one ``error:`` line), the others ``PeerFailed`` (which they exit
on quietly), carrying whether that error dooms the partial output (``discards_partial``).  Anything that escapes outside such a step is a bug; the CLI aborts the job then.
"""
from __future__ import annotations

import fcntl
import os
import stat
import struct
import sys
import termios
import time
import traceback

from ..config.errors import MoeHpcError, PeerFailed


def collective(comm, fn, *args, debug: bool = False, **kwargs):
    """Run ``fn(*args, **kwargs)`` on every rank of ``comm`` and agree on success."""
    error, message, discards = None, None, False
    result = None
    try:
        result = fn(*args, **kwargs)
    except MoeHpcError as exc:
        error, message, discards = exc, str(exc), exc.discards_partial
    except Exception as exc:  # a bug or an OS failure on this rank: still exit together
        if debug:
            traceback.print_exc()
        error, message = exc, f"internal error on rank {comm.Get_rank()}: {type(exc).__name__}: {exc}"
    outcomes = comm.allgather(None if message is None else (message, discards))
    failed = [i for i, m in enumerate(outcomes) if m is not None]
    if not failed:
        return result
    if comm.Get_rank() == failed[0]:
        if isinstance(error, MoeHpcError):
            raise error
        raise MoeHpcError(message) from error
    raise PeerFailed(*outcomes[failed[0]])


def on_rank0(comm, fn, *args, debug: bool = False):
    """``fn(*args)`` on rank 0 only, as one collective step: its result there, None elsewhere."""
    return collective(comm, lambda: fn(*args) if comm.Get_rank() == 0 else None, debug=debug)


# How long an aborting rank waits at most for its error line to leave stderr's pipe.
STDERR_DRAIN_S = 2.0


def unread_stderr_bytes() -> int:
    """Bytes written to stderr that its reader has not taken yet while stderr is a pipe (as
    under mpiexec); 0 for anything else (on a file, a socket or a terminal FIONREAD counts
    something other than unread output)."""
    try:
        sys.stderr.flush()
        fd = sys.stderr.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    except (OSError, ValueError, AttributeError):
        return 0


def abort_job(comm, code: int) -> None:
    """End every rank of the job from this one, after its error line has left for mpiexec.

    Hydra forwards each rank's stderr from a pipe and tears the job down on MPI_Abort; an abort
    that overtakes the forwarding loses the line (1-2% of aborts on 2 busy cores, measured).  So
    wait, boundedly, until the reader has drained the pipe; what it has read precedes the abort."""
    deadline = time.monotonic() + STDERR_DRAIN_S
    while unread_stderr_bytes() and time.monotonic() < deadline:
        time.sleep(0.005)
    comm.Abort(code)


__all__ = ["abort_job", "collective", "on_rank0", "unread_stderr_bytes"]
