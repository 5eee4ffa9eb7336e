"""NCCL on the GPU: the exchange's transport (one message per peer per direction) and the
device collectives of a tensor-parallel group.

Transport.  Rows travel peer-major: the dispatch's send buffer already is (the dispatch plan
sorts by destination), so each peer gets one ``send`` of one contiguous run; the receiver
lands them peer-major and one block-permute kernel (``kernels.permute_blocks``) moves them into
the slot-major layout the expert GEMMs read.  The combine mirrors it: one permute gathers the
expert outputs into peer order, one ``send`` per peer, and the rows land where the weighted sum
expects them.  A rank's rows to itself are one device copy.  Everything runs on the transport's
own high-priority stream, ordered after the compute stream by events, so compute never waits on
the host.  A step's block tables go up once, before its micro-batches (``prepare``); a transfer
posted without them sends its table through a ring of pinned buffers, never a synchronising
copy.  The NCCL id travels over MPI once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..device.backend import Backend
from ..device.kernels import permute_blocks
from .exchange import RowLayout, displacements

TABLE_RING = 8          # block tables in flight before a pinned buffer is reused


def nccl_communicator(comm):
    """An NCCL communicator over the ranks of MPI ``comm`` (collective over ``comm``)."""
    from cupy.cuda import nccl
    rank, size = comm.Get_rank(), comm.Get_size()
    uid = comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0)
    return nccl.NcclCommunicator(size, uid, rank)


class _TableRing:
    """Block tables [3, n] int64 to the device without a synchronising copy: each goes into
    the next pinned host buffer of a ring and up with an asynchronous copy on ``stream``; a
    buffer is refilled only once the event of its last copy has passed."""

    def __init__(self, xp, stream):
        self.xp, self.stream, self.next = xp, stream, 0
        self.slots: list = [None] * TABLE_RING

    def upload(self, table: np.ndarray):
        import cupyx
        i, self.next = self.next, (self.next + 1) % TABLE_RING
        slot = self.slots[i]
        if slot is not None and slot[0].size < table.size and slot[2] is not None:
            slot[2].synchronize()                # the old buffer's copy must be done before it goes
        if slot is None or slot[0].size < table.size:
            host = cupyx.empty_pinned((max(table.size, 64),), np.int64)
            slot = [host, self.xp.empty(host.size, np.int64), None]
            self.slots[i] = slot
        host, dev, event = slot
        if event is not None:
            event.synchronize()                  # in practice long done: TABLE_RING posts ago
        host[:table.size] = table.reshape(-1)
        dev[:table.size].set(host[:table.size], stream=self.stream)
        slot[2] = self.xp.cuda.Event(disable_timing=True)
        slot[2].record(self.stream)
        return dev[:table.size].reshape(table.shape)


@dataclass(frozen=True)
class Route:
    """One micro-batch's transfers, worked out once: the peer-major side and the slot side, and
    the block tables between them on the device (forward: peer-major into slots; back: slots
    into peer order)."""
    peer: RowLayout
    slots: RowLayout
    forward: object
    back: object


class NcclTransport:
    name = "nccl"

    def __init__(self, comm, hidden_size: int, backend: Backend):
        from cupy.cuda import nccl
        self.nccl, self.backend, self.xp = nccl, backend, backend.xp
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.comm = nccl_communicator(comm)
        self.hidden_size, self.row_bytes = hidden_size, hidden_size * 2
        self.stream = backend.new_stream(high_priority=True)
        self.tables = _TableRing(self.xp, self.stream)
        self._areas: dict = {}

    def prepare(self, pairs) -> list[Route]:
        """All micro-batches' block tables in one host-to-device copy (see Exchange.prepare)."""
        tables = [slots.blocks_from_peer_major() for _, slots in pairs]
        host = np.concatenate([np.concatenate([tb.reshape(-1), tb[[1, 0, 2]].reshape(-1)]) for tb in tables]
                              + [np.zeros(1, np.int64)])
        dev = self.xp.asarray(host)
        routes, at = [], 0
        for (peer, slots), tb in zip(pairs, tables):
            n = tb.size
            routes.append(Route(peer, slots, dev[at:at + n].reshape(tb.shape), dev[at + n:at + 2 * n].reshape(tb.shape)))
            at += 2 * n
        return routes

    def _area(self, kind: str, partner, rows: int):
        """A peer-major landing (or staging) area twinned with one of the exchange's buffers
        (keyed by its address, so the two slots of each direction never share one)."""
        key = (kind, partner.data.ptr)
        buf = self._areas.pop(key, None)
        if buf is None or buf.shape[0] < rows:
            buf = self.xp.empty((max(rows, 1), self.hidden_size), partner.dtype)
        self._areas[key] = buf                      # most recent last
        mine = [k for k in self._areas if k[0] == kind]
        for old in mine[:-2]:                       # two buffer slots per direction: older areas
            del self._areas[old]                    # belong to buffers that grew and moved
        return buf[:rows]

    def _table(self, layout: RowLayout, route: Route | None, back: bool):
        """The device table moving ``layout``'s rows from peer order (or back to it)."""
        if route is not None and layout is route.slots:
            return route.back if back else route.forward
        host = layout.blocks_from_peer_major()
        return self.tables.upload(np.ascontiguousarray(host[[1, 0, 2]] if back else host))

    def start(self, send, send_layout: RowLayout, recv, recv_layout: RowLayout, route: Route | None = None) -> dict:
        self.stream.wait_event(self.backend.record())            # the send rows are written
        if self.size == 1:
            return self._start_alone(send, send_layout, recv, recv_layout, route)
        sc, rc = send_layout.per_peer, recv_layout.per_peer
        so, ro = displacements(sc), displacements(rc)
        rb, me, uint8, s = self.row_bytes, self.rank, self.nccl.NCCL_UINT8, self.stream.ptr
        with self.stream:
            src = send
            if not send_layout.is_peer_major:               # combine: expert outputs into peer order
                src = self._area("staging", send, send_layout.rows)
                table = self._table(send_layout, route, back=True)
                permute_blocks(send, src, table, table.shape[1])
            land = recv if recv_layout.is_peer_major else self._area("landing", recv, recv_layout.rows)
            if sc[me]:                                       # this rank's own rows: one copy
                self.xp.cuda.runtime.memcpyAsync(land.data.ptr + int(ro[me]) * rb, src.data.ptr + int(so[me]) * rb,
                                                 int(sc[me]) * rb, 3, s)      # 3: device to device
            self.nccl.groupStart()
            for peer in range(self.size):
                if peer == me:
                    continue
                if sc[peer]:
                    self.comm.send(src.data.ptr + int(so[peer]) * rb, int(sc[peer]) * rb, uint8, peer, s)
                if rc[peer]:
                    self.comm.recv(land.data.ptr + int(ro[peer]) * rb, int(rc[peer]) * rb, uint8, peer, s)
            self.nccl.groupEnd()
            if land is not recv:                             # dispatch: peer order into expert slots
                table = self._table(recv_layout, route, back=False)
                permute_blocks(land, recv, table, table.shape[1])
        return {"done": self.backend.record(self.stream), "keep": (src, land)}

    def _start_alone(self, send, send_layout: RowLayout, recv, recv_layout: RowLayout, route) -> dict:
        """One rank: every row is its own, so the one permute between peer order and expert
        slots is the whole exchange (no landing or staging copy of the whole step)."""
        with self.stream:
            if send_layout.is_peer_major and recv_layout.is_peer_major:
                self.xp.cuda.runtime.memcpyAsync(recv.data.ptr, send.data.ptr, int(send_layout.rows) * self.row_bytes,
                                                 3, self.stream.ptr)
            else:
                back = not send_layout.is_peer_major               # combine: slots into peer order
                table = self._table(send_layout if back else recv_layout, route, back=back)
                permute_blocks(send, recv, table, table.shape[1])
        return {"done": self.backend.record(self.stream), "keep": (send,)}

    def finish(self, state: dict) -> None:
        self.backend.current_stream().wait_event(state["done"])

    def close(self) -> None:
        self.comm.destroy()


class NcclGroup:
    """Device collectives of a small group (a tensor-parallel group of expert ranks) on the
    current stream: broadcast of bf16 rows, fp32 sum to the leader."""

    def __init__(self, comm, backend: Backend):
        from cupy.cuda import nccl
        self.nccl, self.backend, self.mpi = nccl, backend, comm
        self.comm = nccl_communicator(comm)
        self.rank = comm.Get_rank()

    def broadcast(self, buf, root: int = 0) -> None:
        """buf: a contiguous device array (any 2-byte dtype), overwritten on non-roots."""
        s = self.backend.current_stream().ptr
        self.comm.bcast(buf.data.ptr, buf.size * buf.dtype.itemsize, self.nccl.NCCL_UINT8, root, s)

    def reduce_sum(self, buf, out, root: int = 0) -> None:
        """buf: contiguous fp32 device array; its sum over the group lands in ``out`` on ``root``."""
        s = self.backend.current_stream().ptr
        target = out.data.ptr if self.rank == root else buf.data.ptr
        self.comm.reduce(buf.data.ptr, target, buf.size, self.nccl.NCCL_FLOAT32, self.nccl.NCCL_SUM, root, s)

    def allreduce_sum(self, buf) -> None:
        """buf: contiguous fp32 device array, in place: the sum over the group on every member."""
        s = self.backend.current_stream().ptr
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self.nccl.NCCL_FLOAT32, self.nccl.NCCL_SUM, s)

    def close(self) -> None:
        self.comm.destroy()


__all__ = ["NcclTransport", "NcclGroup", "Route", "nccl_communicator"]
