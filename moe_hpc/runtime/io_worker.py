"""One background thread per dense rank for a run's file I/O, so that reading the next chunk and
writing and syncing the last one overlap the chunk being computed (``runner.py: _RankChunks``).

h5py releases the GIL inside its reads, ``os.pwrite`` and ``os.fdatasync`` inside theirs, so the
main thread keeps computing (and launching kernels) meanwhile.

The thread makes no MPI call (every collective of the job stays on the main thread, so the
ranks' calls match whatever thread level the MPI library gave). Its results, the
errors it raised included, are taken on the main thread inside ``comm.failure.collective``, where
every rank agrees on them at the same step as when the I/O ran on the main thread.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class IoWorker:
    """A single thread running the I/O handed to it, one job at a time, in the order handed."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-hpc-io")

    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on the thread; its result (or exception) comes back through the future."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Drop the jobs not yet started, wait for the one running (no write is left half-done),
        and end the thread: none outlives the job."""
        self._pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["IoWorker"]
