"""The expert-parallel layer written the plain way, as the bench's yardstick.

What a user would write first with CuPy and NCCL, on the same weights, gate and placement as
the engine: top-k; group the (token, choice) rows by destination with one sort; copy the counts
to the host and all-to-all them; one NCCL all-to-all of the rows (and of their slot ids); each
local expert's rows picked out and run through its two GEMMs; one all-to-all back; the weighted
sum.  Nothing overlaps and every step waits for the one before.  ``moe-hpc bench`` times it in
the same run as the engine's layer and prints the ratio.
"""
from __future__ import annotations

import numpy as np

from ..comm.nccl import nccl_communicator
from ..device.dtypes import BF16, F32
from ..device.kernels import activation
from ..model.gate import gate


def _u16(a):
    return a.view(np.uint16)


class PlainEpLayer:
    """comm: the exchange's MPI communicator; tables: the engine's RouteTables (first replica of
    each expert); experts: the engine's stacked LocalExperts; gate: [H, E] bf16."""

    def __init__(self, comm, cp, tables, experts, gate, top_k: int, normalize: bool, first_flat: int):
        self.comm, self.cp, self.P = comm, cp, comm.Get_size()
        self.nccl = nccl_communicator(comm)
        self.tables, self.experts, self.gate = tables, experts, gate
        self.k, self.normalize, self.first_flat = top_k, normalize, first_flat

    def _all_to_all(self, send, send_counts, recv, recv_counts, row_bytes: int) -> None:
        from cupy.cuda import nccl
        so = np.concatenate(([0], np.cumsum(send_counts)[:-1]))
        ro = np.concatenate(([0], np.cumsum(recv_counts)[:-1]))
        stream = self.cp.cuda.get_current_stream().ptr
        nccl.groupStart()
        for p in range(self.P):
            if send_counts[p]:
                self.nccl.send(send.data.ptr + int(so[p]) * row_bytes, int(send_counts[p]) * row_bytes,
                               nccl.NCCL_UINT8, p, stream)
            if recv_counts[p]:
                self.nccl.recv(recv.data.ptr + int(ro[p]) * row_bytes, int(recv_counts[p]) * row_bytes,
                               nccl.NCCL_UINT8, p, stream)
        nccl.groupEnd()

    def __call__(self, x):
        """x: [T, H] bf16 -> [T, H] bf16 (the routed experts' weighted sum, without b2)."""
        cp, k = self.cp, self.k
        T, H = x.shape
        r = gate(x, self.gate, None, k, self.normalize, cp)
        flat = r.experts.reshape(-1).astype(cp.int64) + self.first_flat
        dest = self.tables.holders[flat, 0]
        slot = self.tables.slot[flat, 0].astype(cp.int32)
        order = cp.argsort(dest)
        send_counts = cp.bincount(dest, minlength=self.P).get()               # host sync
        recv_counts = np.empty_like(send_counts)
        self.comm.Alltoall(send_counts, recv_counts)                          # counts all-to-all
        send = _u16(x)[order // k]
        recv = cp.empty((int(recv_counts.sum()), H), cp.uint16)
        self._all_to_all(send, send_counts, recv, recv_counts, 2 * H)
        recv_slot = cp.empty(int(recv_counts.sum()), cp.int32)
        self._all_to_all(slot[order], send_counts, recv_slot, recv_counts, 4)
        rows = recv.view(BF16)
        out = cp.empty_like(recv)
        w1, b1, w2 = self.experts.stacked
        for j in range(self.experts.num_slots):                             # per-expert GEMMs
            idx = cp.nonzero(recv_slot == j)[0]
            if idx.size == 0:
                continue
            h = cp.matmul(rows[idx], w1[j]).astype(F32)
            if b1 is not None:
                h += b1[j].astype(F32)
            y = cp.matmul(activation(h, self.experts.activation, cp).astype(BF16), w2[j])
            out[idx] = _u16(y)
        back = cp.empty_like(send)
        self._all_to_all(out, recv_counts, back, send_counts, 2 * H)       # and back
        unsorted = cp.empty_like(back)
        unsorted[order] = back
        choices = unsorted.view(BF16).reshape(T, k, H).astype(F32)
        return (choices * r.weights[:, :, None]).sum(axis=1).astype(BF16)

    def close(self) -> None:
        self.nccl.destroy()


__all__ = ["PlainEpLayer"]
