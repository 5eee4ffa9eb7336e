"""NCCL transport: grouped send/recv, one pair per (peer, expert) block.

Block-wise transfers let every row land straight in its expert's contiguous block on the
receiver (and back in the sender's order on the combine), so no scatter follows.  The NCCL id
travels over MPI once; all NCCL work runs on the exchange's own stream, ordered after the
compute stream by events, so compute never waits on the host.
"""
from __future__ import annotations

import numpy as np

from ..device.backend import Backend


class NcclTransport:
    name = "nccl"

    def __init__(self, comm, hidden_size: int, backend: Backend):
        from cupy.cuda import nccl
        self.nccl, self.backend, self.xp = nccl, backend, backend.xp
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        uid = comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.row_bytes = hidden_size * 2
        self.stream = backend.new_stream()

    def _blocks(self, layout, peer: int):
        """(byte offset, byte count) of each non-empty block for ``peer``, in expert order."""
        counts, offsets = layout.counts[peer], layout.offsets[peer]
        nz = np.nonzero(counts)[0]
        return [(int(offsets[e]) * self.row_bytes, int(counts[e]) * self.row_bytes) for e in nz]

    def start(self, send, send_layout, recv, recv_layout) -> dict:
        self.stream.wait_event(self.backend.record())            # the send rows are written
        sp, rp, s = send.data.ptr, recv.data.ptr, self.stream.ptr
        uint8 = self.nccl.NCCL_UINT8
        self._copy_to_self(send, send_layout, recv, recv_layout)
        self.nccl.groupStart()
        for peer in range(self.size):
            if peer == self.rank:
                continue
            for off, n in self._blocks(send_layout, peer):
                self.comm.send(sp + off, n, uint8, peer, s)
            for off, n in self._blocks(recv_layout, peer):
                self.comm.recv(rp + off, n, uint8, peer, s)
        self.nccl.groupEnd()
        return {"done": self.backend.record(self.stream)}

    def _copy_to_self(self, send, send_layout, recv, recv_layout) -> None:
        """This rank's own rows: one gather-scatter launch instead of a copy per expert block."""
        me = self.rank
        counts = send_layout.counts[me]
        nz = np.nonzero(counts)[0]
        if nz.size == 0:
            return
        c = counts[nz]
        first = np.repeat(np.arange(c.size), c)
        within = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        src = send_layout.offsets[me][nz][first] + within
        dst = recv_layout.offsets[me][nz][first] + within
        from ..device.kernels_cuda import move_rows
        with self.stream:
            move_rows(send, recv, self.xp.asarray(src), self.xp.asarray(dst))

    def finish(self, state: dict) -> None:
        self.backend.current_stream().wait_event(state["done"])

    def close(self) -> None:
        self.comm.destroy()
