"""Activations from one pipeline stage to the next (``parallel.dense_stages``).

A wave of sequences leaves a stage after its last block and enters the next before its first;
sends are non-blocking host copies (MPI here need not take device memory) tagged by the wave's
first sequence, so waves in flight never mix.
"""
from __future__ import annotations

import numpy as np

from ..device.backend import words


class StageLink:
    """This dense rank's links to the stages before and after it, over the group communicator.

    comm: the group communicator; prev, next: the group ranks of the neighbouring stages' peers
    (None at the first / last stage); backend: host <-> device copies."""

    def __init__(self, comm, prev: int | None, next: int | None, backend):
        self.comm, self.prev, self.next, self.backend = comm, prev, next, backend
        self._sends = []

    def send(self, x, a: int, b: int) -> None:
        """Sequences [a, b) of x [s, L, H] bf16 go on to the next stage (non-blocking)."""
        from mpi4py import MPI
        if b == a:
            return
        host = np.ascontiguousarray(self.backend.to_host(x[a:b])).view(np.uint16)
        self._sends.append((host, self.comm.Isend([host, MPI.UINT16_T], dest=self.next, tag=a)))

    def receive(self, x, a: int, b: int) -> None:
        """Sequences [a, b) arrive from the stage before, into x [s, L, H] bf16."""
        from mpi4py import MPI
        if b == a:
            return
        host = np.empty(x[a:b].shape, np.uint16)
        self.comm.Recv([host, MPI.UINT16_T], source=self.prev, tag=a)
        words(x[a:b])[...] = self.backend.asarray(host)

    def wait_sends(self) -> None:
        """Every send of this chunk has left (its host copy may be reused)."""
        from mpi4py import MPI
        MPI.Request.Waitall([request for _, request in self._sends])
        self._sends = []


__all__ = ["StageLink"]
