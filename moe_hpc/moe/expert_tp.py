"""Tensor parallelism inside an expert (``parallel.expert_tp = t``).

The slot leader received the micro-batch's rows; every partner of its TP group computes its
column shard of w1 and row shard of w2 on them (``LocalExperts`` loaded those shards), and the
partial outputs are summed in fp32 on the leader and rounded to bf16 once, so the result equals
the unsplit expert's up to the order of the fp32 sum.

Blocking collectives on the TP communicator, called by all partners in the same order (the
exchanges meanwhile stay in flight).  Host buffers: on the GPU this stages through the host; a
CUDA-aware MPI or NCCL all-reduce is the faster road there.
"""
from __future__ import annotations

import numpy as np

from ..device.dtypes import BF16, F32


def _mpi():
    from mpi4py import MPI
    return MPI


def tensor_parallel_experts(tp, backend, experts, rows, layout, out, buffer):
    """tp: this slot's TP communicator (leader = rank 0); experts: LocalExperts (this rank's
    shards); rows: [extent, H] bf16 on the leader; out: [extent, H] bf16, written on the leader;
    buffer: the exchange's buffer allocator. -> the leader's RowLayout (what every partner
    computed on)."""
    MPI, xp = _mpi(), backend.xp
    leader = tp.Get_rank() == 0
    work = tp.bcast(layout if leader else None, root=0)
    H = out.shape[1]
    shared = backend.to_host(rows[:work.extent]) if leader else np.empty((work.extent, H), BF16)
    tp.Bcast([shared.view(np.uint16), MPI.UINT16_T], root=0)
    partial = xp.empty((work.extent, H), dtype=F32)
    experts.forward(backend.asarray(shared), work, partial, buffer)
    partial = backend.to_host(partial)
    total = np.empty_like(partial) if leader else None
    tp.Reduce(partial, total, op=MPI.SUM, root=0)
    if leader:
        out[:work.extent] = backend.asarray(total.astype(BF16))
    return work


__all__ = ["tensor_parallel_experts"]
