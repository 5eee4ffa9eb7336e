"""Tensor parallelism inside an expert (``parallel.expert_tp = t``).

The slot leader received the micro-batch's rows; every partner of its TP group computes its
column shard of w1 and row shard of w2 on them (``LocalExperts`` loaded those shards), and the
partial outputs are summed in fp32 on the leader and rounded to bf16 once, so the result equals
the unsplit expert's up to the order of the fp32 sum.

The layout (host numbers) goes over the group's MPI communicator; the rows and partial sums go
through ``comm.groups``: NCCL on the compute stream on GPUs, MPI on host arrays elsewhere.  All
partners call this in the same order (the exchanges meanwhile stay in flight).
"""
from __future__ import annotations

from ..device.dtypes import BF16, F32


def tensor_parallel_experts(tp, group, backend, experts, rows, layout, out, buffer):
    """tp: this slot's TP communicator (leader = rank 0); group: ``comm.groups`` collectives over
    it; experts: LocalExperts (this rank's shards); rows: [extent, H] bf16 on the leader; out:
    [extent, H] bf16, written on the leader; buffer(name, slot, rows, width): the exchange's
    allocator. -> the leader's RowLayout (what every partner computed on)."""
    xp = backend.xp
    leader = tp.Get_rank() == 0
    work = tp.bcast(layout if leader else None, root=0)
    n, H = work.extent, out.shape[1]
    if n == 0:
        return work
    shared = rows[:n] if leader else buffer("tp-rows", 0, n)
    group.broadcast(shared, root=0)
    partial = xp.empty((n, H), dtype=F32)
    experts.forward(shared, work, partial, buffer)
    total = xp.empty((n, H), dtype=F32) if leader else None
    group.reduce_sum(partial, total, root=0)
    if leader:
        out[:n] = total.astype(BF16)
    return work


__all__ = ["tensor_parallel_experts"]
