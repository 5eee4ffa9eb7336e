"""Collectives of a small group of ranks on their arrays, wherever the arrays live.

A tensor-parallel expert group needs two: the leader's rows broadcast to its partners, and the
partners' fp32 partial outputs summed on the leader; a tensor-parallel dense group sums its
partial attention and MLP outputs on every member (all-reduce) and broadcasts the leader's MoE
output.  On the GPU with NCCL they run on the
device, on the compute stream (``nccl.NcclGroup``); elsewhere over MPI on host arrays, staged
through the host when the arrays are on a GPU without NCCL (correct, slow: said in the docs).
"""
from __future__ import annotations

import numpy as np

from ..device.backend import Backend


class MpiGroup:
    """The same two collectives over MPI; device arrays are copied through the host."""

    def __init__(self, comm, backend: Backend):
        self.comm, self.backend, self.rank = comm, backend, comm.Get_rank()

    def broadcast(self, buf, root: int = 0) -> None:
        from mpi4py import MPI
        host = self.backend.to_host(buf) if self.rank == root else np.empty(buf.shape, buf.dtype)
        self.comm.Bcast([host.view(np.uint8), MPI.BYTE], root=root)
        if self.rank != root:
            buf[...] = self.backend.asarray(host)

    def reduce_sum(self, buf, out, root: int = 0) -> None:
        from mpi4py import MPI
        part = np.ascontiguousarray(self.backend.to_host(buf), dtype=np.float32)
        total = np.empty_like(part) if self.rank == root else None
        self.comm.Reduce(part, total, op=MPI.SUM, root=root)
        if self.rank == root:
            out[...] = self.backend.asarray(total)

    def allreduce_sum(self, buf) -> None:
        """buf: fp32, in place: the sum over the group on every member."""
        from mpi4py import MPI
        part = np.ascontiguousarray(self.backend.to_host(buf), dtype=np.float32)
        total = np.empty_like(part)
        self.comm.Allreduce(part, total, op=MPI.SUM)
        buf[...] = self.backend.asarray(total)

    def close(self) -> None:
        pass


def make_group(comm, backend: Backend):
    """The group collectives for ``comm``: NCCL on the GPU where it is available, else MPI."""
    if backend.name == "gpu":
        from .transports import nccl_available
        if nccl_available():
            from .nccl import NcclGroup
            return NcclGroup(comm, backend)
    return MpiGroup(comm, backend)


__all__ = ["MpiGroup", "make_group"]
