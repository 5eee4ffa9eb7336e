"""The ``ipc`` transport: each row written straight into its destination rank's receive slot, and
the combine straight back, through GPU memory mapped with CUDA IPC.  Intranode only.

Buffers.  Every rank allocates one region (``cudaMalloc``) at start-up: flag words, then five
receive areas of ``capacity`` rows each: dispatch slots 0 and 1, combine slots 0 and 1 (the
Exchange hands these out as its ``dispatch-recv`` / ``combine-recv`` buffers, so the expert
GEMMs read the rows where they landed), and a spare area for a transfer into any other buffer
(landed there, then copied out).  Regions have the same layout on every rank (one capacity, the
largest any rank needs), their IPC handles travel once over MPI, and every rank maps every
peer's.  A step that needs more rows than the capacity grows every region together (collective,
at ``prepare``, with the device drained first).

Addresses.  The sender does not know where its rows land in a peer's slot layout (that depends
on every source's counts), so at ``prepare`` each rank sends each peer, in one host Alltoall, the
row offsets of that peer's blocks in its own receive layouts of the step (both directions, every
micro-batch) and the rows it needs.  Each rank then holds one block table per transfer:
(destination rank, source row, destination row, rows) -- ``put_table`` -- uploaded in one copy.
A transfer posted without ``prepare`` (the bench's plain all-to-all) makes the same Alltoall
for itself.

Order (``device/peer_rows.py`` has the kernels).  Every rank posts the same transfers in the same
order (the layer's loop), so each gets the same sequence number ``seq`` everywhere.  A transfer
is, on the transport's stream (after the compute stream's queued work, by an event):
ready (tell every peer this rank has reached ``seq``, so its reads of the areas are done), put
(wait for every peer's ready, write the rows with ``PUT_BLOCKS`` blocks, then flag DONE in every
peer), wait (until every peer's DONE for ``seq`` is here), and a copy out of the spare area if
that is where it landed.  ``finish`` makes the compute stream wait for the end of that.
No permute on either side: the put writes each (peer, slot) block at its final row.
"""
from __future__ import annotations

import numpy as np

from ..config.errors import ConfigError
from ..device.backend import Backend
from ..device.dtypes import BF16
from ..device.peer_rows import flag_words
from .exchange import SLOT_ROUND, RowLayout
from .nccl import Route

AREAS = {"dispatch-recv": 0, "combine-recv": 2}     # first of each name's two slots
SPARE = 4                                          # any other receive buffer lands here first
AREA_COUNT = 5
ALIGN = 256                                        # bytes: every area starts on this boundary


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def region_bytes(peers: int, capacity: int, row_bytes: int) -> tuple[int, int, int]:
    """-> (flag bytes, bytes per area, total) of a region: flags, then AREA_COUNT areas."""
    flags, area = _aligned(flag_words(peers) * 8), _aligned(max(capacity, 1) * row_bytes)
    return flags, area, flags + AREA_COUNT * area


def area_offset(index: int, peers: int, capacity: int, row_bytes: int) -> int:
    """Byte offset of receive area ``index`` in every rank's region."""
    flags, area, _ = region_bytes(peers, capacity, row_bytes)
    return flags + index * area


def grown_capacity(capacity: int, need: int) -> int:
    """Rows per area after a step needing ``need``: unchanged when it fits, else half again
    (at least the need), a multiple of SLOT_ROUND, so growth is rare."""
    if need <= capacity:
        return capacity
    rows = max(need, capacity + capacity // 2)
    return -(-rows // SLOT_ROUND) * SLOT_ROUND


def offsets_payload(receives: list[RowLayout]) -> np.ndarray:
    """What this rank sends each peer before a step: row p = the offsets of p's blocks in each of
    this rank's receive layouts (side by side), then the rows its areas must hold.
    -> [P, sum of widths + 1] int64."""
    need = max((lay.extent for lay in receives), default=0)
    cols = [lay.offsets for lay in receives] + [np.full((receives[0].offsets.shape[0], 1), need)]
    return np.concatenate(cols, axis=1).astype(np.int64)


def split_payload(received: np.ndarray, receives: list[RowLayout]) -> tuple[list[np.ndarray], int]:
    """The Alltoall's result (row p: what rank p sent this rank) -> one [P, S] array per layout
    (where this rank's block (p, s) lands in rank p's area), and the rows every area must hold
    (the largest need of any rank: the same number on every rank)."""
    remotes, at = [], 0
    for lay in receives:
        width = lay.offsets.shape[1]
        remotes.append(received[:, at:at + width])
        at += width
    return remotes, int(received[:, at].max())


def put_table(send: RowLayout, remote: np.ndarray) -> np.ndarray:
    """The put kernel's table of one transfer: for each non-empty (peer p, slot s) block of
    ``send``: [p, its row in the send buffer, remote[p, s] (its row in p's area), rows].
    -> [4, blocks] int64."""
    p, s = np.nonzero(send.counts)
    return np.stack([p, send.offsets[p, s], remote[p, s], send.counts[p, s]]).astype(np.int64)


def require_one_node(comm) -> None:
    """CUDA IPC maps memory of GPUs in one node only: every exchange rank must share this one."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    together = node.Get_size() == comm.Get_size()
    node.Free()
    if not together:
        raise ConfigError("run.transport = 'ipc' maps peers' GPU memory through CUDA IPC, which works within "
                          "one node, and this run's exchange ranks span several nodes; use 'nccl' across nodes")


class IpcTransport:
    """Rows straight into peers' mapped receive areas (see the module docstring)."""
    name = "ipc"

    def __init__(self, comm, hidden_size: int, backend: Backend):
        require_one_node(comm)
        self.comm, self.backend, self.xp = comm, backend, backend.xp
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.hidden_size, self.row_bytes = hidden_size, hidden_size * BF16.itemsize
        self.stream = backend.new_stream(high_priority=True)
        self.seq = 0                               # transfers posted so far: the same on every rank
        self.capacity, self.region, self.mapped, self.bases = 0, None, [], None
        self._map(SLOT_ROUND)

    # -------------------------------------------------------------------- regions and mapping

    def _map(self, capacity: int) -> None:
        """(Re)allocate this rank's region for ``capacity`` rows per area and map every peer's
        (collective; nothing may be in flight)."""
        rt = self.xp.cuda.runtime
        if self.region is not None:
            self._unmap()
        _, _, total = region_bytes(self.size, capacity, self.row_bytes)
        handle = self._agreed("allocate its receive region", lambda: self._allocate(total))
        handles = self.comm.allgather(handle)
        self.mapped = self._agreed("map its peers' regions (GPUs without peer access?)",
                                   lambda: [self.region if p == self.rank else rt.ipcOpenMemHandle(h)
                                            for p, h in enumerate(handles)])
        self.bases = self.xp.asarray(np.array(self.mapped, dtype=np.uint64))
        self.capacity = capacity

    def _allocate(self, total: int) -> bytes:
        rt = self.xp.cuda.runtime
        try:
            self.region = rt.malloc(total)
        except Exception:                          # CuPy's pool may hold the memory, unused: give it back
            self.xp.get_default_memory_pool().free_all_blocks()
            self.region = rt.malloc(total)
        rt.memset(self.region, 0, total)           # flags start at 0: below every seq
        rt.deviceSynchronize()
        return rt.ipcGetMemHandle(self.region)

    def _agreed(self, what: str, step):
        """Run ``step`` on every rank; if it failed anywhere, every rank raises the same error."""
        try:
            result, error = step(), None
        except Exception as exc:                    # CUDA errors: report them, collectively
            result, error = None, f"{type(exc).__name__}: {exc}"
        errors = self.comm.allgather(error)
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if bad:
            r, e = bad[0]
            raise ConfigError(f"run.transport = 'ipc': rank {r} could not {what} ({e}); use 'nccl'")
        return result

    def _unmap(self) -> None:
        rt = self.xp.cuda.runtime
        rt.deviceSynchronize()                      # every queued read and write of the regions
        for p, ptr in enumerate(self.mapped):
            if p != self.rank:
                rt.ipcCloseMemHandle(ptr)
        self.comm.Barrier()                         # no peer still maps this region
        rt.free(self.region)
        self.region, self.mapped = None, []

    def _area_ptr(self, index: int) -> int:
        return self.region + area_offset(index, self.size, self.capacity, self.row_bytes)

    def receive_area(self, name: str, slot: int, rows: int, width: int):
        """The Exchange's ``name`` buffer of ``slot``: [rows, width] bf16 in this rank's mapped
        region, or None for buffers this transport does not map."""
        if name not in AREAS or width != self.hidden_size or rows > self.capacity:
            return None
        index = AREAS[name] + slot % 2
        cuda = self.xp.cuda
        memory = cuda.UnownedMemory(self._area_ptr(index), max(rows, 1) * self.row_bytes, self)
        return self.xp.ndarray((rows, width), dtype=BF16, memptr=cuda.MemoryPointer(memory, 0))

    def _area_of(self, recv) -> int:
        """Which area a receive buffer is (SPARE if it is not one of them)."""
        ptr = recv.data.ptr
        return next((i for i in range(SPARE) if ptr == self._area_ptr(i)), SPARE)

    # -------------------------------------------------------------------- addresses

    def _agree(self, receives: list[RowLayout]) -> list[np.ndarray]:
        """Collective: every peer's offsets for this rank's blocks in ``receives`` (one per
        layout, [P, S]); grows every region first if any rank needs more rows."""
        payload = offsets_payload(receives)
        received = np.empty_like(payload)
        self.comm.Alltoall(payload, received)
        remotes, need = split_payload(received, receives)
        if need > self.capacity:
            self._map(grown_capacity(self.capacity, need))
        return remotes

    def _upload(self, tables: list[np.ndarray]) -> list:
        """Host tables [4, n] -> device views of one copy."""
        host = np.concatenate([t.reshape(-1) for t in tables] + [np.zeros(1, np.int64)])
        dev, out, at = self.xp.asarray(host), [], 0
        for t in tables:
            out.append(dev[at:at + t.size].reshape(t.shape))
            at += t.size
        return out

    def prepare(self, pairs) -> list[Route]:
        """Collective: every micro-batch's tables, both directions, from one Alltoall and one
        host-to-device copy. pairs: (peer-major send layout, slot layout) per micro-batch."""
        n = len(pairs)
        remotes = self._agree([slots for _, slots in pairs] + [peer for peer, _ in pairs])
        forward = [put_table(peer, remotes[i]) for i, (peer, _) in enumerate(pairs)]
        back = [put_table(slots, remotes[n + i]) for i, (_, slots) in enumerate(pairs)]
        dev = self._upload(forward + back)
        return [Route(peer, slots, dev[i], dev[n + i]) for i, (peer, slots) in enumerate(pairs)]

    def _table(self, send_layout: RowLayout, recv_layout: RowLayout, route: Route | None):
        if route is not None and send_layout is route.peer:
            return route.forward
        if route is not None and send_layout is route.slots:
            return route.back
        remote, = self._agree([recv_layout])          # collective: an unprepared transfer
        return self._upload([put_table(send_layout, remote)])[0]

    # -------------------------------------------------------------------- transfers

    def start(self, send, send_layout: RowLayout, recv, recv_layout: RowLayout, route: Route | None = None) -> dict:
        from ..device.peer_rows import put_rows, signal_ready, wait_done
        table = self._table(send_layout, recv_layout, route)      # may grow the regions: first
        if recv_layout.extent > self.capacity:     # prepare sized every area for its routes: a bug
            raise RuntimeError(f"ipc transport: {recv_layout.extent} rows exceed its {self.capacity}-row areas")
        area = self._area_of(recv)
        self.seq += 1
        me, P, seq = self.rank, self.size, self.seq
        self.stream.wait_event(self.backend.record())            # the send rows are written
        with self.stream:
            signal_ready(self.bases, me, P, seq)
            put_rows(send, self.bases, area_offset(area, P, self.capacity, self.row_bytes), table,
                     table.shape[1], me, P, seq)
            wait_done(self.bases, me, P, seq)
            rows = min(int(recv_layout.extent), recv.shape[0])
            if area == SPARE and rows:                          # landed in the spare area: out
                self.xp.cuda.runtime.memcpyAsync(recv.data.ptr, self._area_ptr(SPARE), rows * self.row_bytes,
                                                 3, self.stream.ptr)      # 3: device to device
        return {"done": self.backend.record(self.stream), "keep": (send, table)}

    def finish(self, state: dict) -> None:
        self.backend.current_stream().wait_event(state["done"])

    def close(self) -> None:
        if self.region is not None:
            self._unmap()


__all__ = ["IpcTransport", "put_table", "offsets_payload", "split_payload", "region_bytes", "area_offset",
           "grown_capacity", "require_one_node", "AREAS", "SPARE"]
