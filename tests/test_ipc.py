"""The ``ipc`` transport's host side, on the CPU: its block tables, offsets exchange and region
arithmetic, checked by simulating every rank with NumPy (the put kernel's twin is one slice
assignment per table block) against the MPI transports' way of moving the same rows (land peer
by peer, then scatter); and the transport object's glue on one rank over fake device memory.
The device side runs in tests/test_gpu.py."""
import numpy as np
import pytest

from moe_hpc.comm.exchange import SLOT_ROUND, displacements
from moe_hpc.comm.ipc import (AREAS, SPARE, area_offset, grown_capacity, offsets_payload, put_table, region_bytes,
                              require_one_node, split_payload)
from moe_hpc.config.errors import ConfigError
from moe_hpc.device.peer_rows import flag_words
from moe_hpc.moe.dispatch import dispatch_layout


def put(table, src, areas):
    """NumPy twin of ``peer_rows.put_rows``: table [4, n] = (rank, source row, dest row, rows)."""
    for p, s, d, n in table.T:
        areas[p][d:d + n] = src[s:s + n]


def layouts(P, S, hosted, rng):
    """Every rank's DispatchLayout of one micro-batch with random counts (some blocks empty)."""
    send = rng.integers(0, 5, (P, P, S)) * (rng.random((P, P, S)) < 0.7)
    send[:, :, hosted:] = 0                                  # only hosted slots receive rows
    recv = send.transpose(1, 0, 2)                           # recv[p][q, s] = send[q][p, s]
    return [dispatch_layout(send[r][None], recv[r][None], S, hosted) for r in range(P)]


def agree(receives):
    """The Alltoall of ``IpcTransport._agree`` over simulated ranks: receives[r] is rank r's list."""
    payloads = [offsets_payload(lays) for lays in receives]
    P = len(receives)
    return [split_payload(np.stack([payloads[p][r] for p in range(P)]), receives[r]) for r in range(P)]


@pytest.mark.parametrize("P, S, hosted, seed", [(2, 3, 3, 0), (3, 4, 2, 1), (4, 6, 5, 2), (1, 2, 2, 3)])
def test_tables_put_rows_where_the_mpi_transport_scatters_them(P, S, hosted, seed):
    rng = np.random.default_rng(seed)
    lay = layouts(P, S, hosted, rng)
    sends, slots = [x.sends[0] for x in lay], [x.receives[0] for x in lay]
    agreed = agree([[slots[r], sends[r]] for r in range(P)])
    H = 3
    # dispatch: peer-major rows into every receiver's slot layout
    src = [rng.standard_normal((s.rows, H)) for s in sends]
    areas = [np.zeros((x.extent, H)) for x in slots]
    for r in range(P):
        put(put_table(sends[r], agreed[r][0][0]), src[r], areas)
    for p in range(P):
        landing = np.concatenate([src[q][displacements(sends[q].per_peer)[p]:][:sends[q].per_peer[p]]
                                  for q in range(P)])
        expected = np.zeros_like(areas[p])
        scatter = slots[p].peer_major_scatter()
        expected[np.arange(len(landing)) if scatter is None else scatter] = landing
        np.testing.assert_array_equal(areas[p], expected)
    # combine: each receiver's slot rows straight back into the senders' peer-major buffers
    out = [rng.standard_normal((x.extent, H)) for x in slots]
    backs = [np.zeros((s.rows, H)) for s in sends]
    for r in range(P):
        put(put_table(slots[r], agreed[r][0][1]), out[r], backs)
    for q in range(P):
        gathered = [out[p][slots[p].peer_major_scatter() if slots[p].peer_major_scatter() is not None
                           else np.arange(slots[p].rows)] for p in range(P)]
        expected = np.concatenate([gathered[p][displacements(slots[p].per_peer)[q]:][:slots[p].per_peer[q]]
                                   for p in range(P)])
        np.testing.assert_array_equal(backs[q], expected)
    # every rank learns the same need: the largest area any rank's layouts span
    assert {need for _, need in agreed} == {max(max(x.extent for x in slots), max(s.rows for s in sends))}


def test_put_table_names_each_nonempty_block():
    lay = layouts(2, 2, 2, np.random.default_rng(5))[0].sends[0]
    remote = np.array([[10, 20], [30, 40]])
    table = put_table(lay, remote)
    p, s = np.nonzero(lay.counts)
    assert table.shape == (4, len(p)) and table.dtype == np.int64
    assert table[0].tolist() == p.tolist()
    assert table[2].tolist() == remote[p, s].tolist()
    assert table[3].tolist() == lay.counts[p, s].tolist() and (table[3] > 0).all()


def test_regions_have_aligned_disjoint_areas_behind_the_flags():
    P, cap, row = 4, 100, 7168 * 2
    flags, area, total = region_bytes(P, cap, row)
    assert flags >= flag_words(P) * 8 and flags % 256 == 0 and area % 256 == 0 and area >= cap * row
    starts = [area_offset(i, P, cap, row) for i in range(SPARE + 1)]
    assert starts[0] == flags and all(b - a == area for a, b in zip(starts, starts[1:]))
    assert starts[-1] + area == total
    assert sorted(AREAS.values()) == [0, 2]                 # two slots each: 0, 1 and 2, 3; spare 4


def test_capacity_grows_by_half_in_slot_rounds_only_when_needed():
    R = SLOT_ROUND
    assert grown_capacity(4 * R, 4 * R) == 4 * R
    assert grown_capacity(4 * R, 4 * R + 1) == 6 * R                   # half again
    assert grown_capacity(4 * R, 20 * R - 3) == 20 * R                  # the need, rounded up
    assert grown_capacity(R, 1) == R


class _Comm:
    def __init__(self, size, node_size):
        self.size, self.node_size = size, node_size

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size

    def Split_type(self, kind, key=0):
        return _Comm(self.node_size, self.node_size)

    def Free(self):
        pass


def test_ranks_on_several_nodes_are_told_to_use_nccl():
    require_one_node(_Comm(4, 4))
    with pytest.raises(ConfigError, match="within one node.*use 'nccl' across nodes"):
        require_one_node(_Comm(4, 2))


def test_ipc_on_the_cpu_backend_is_a_config_error():
    from moe_hpc.comm.transports import make_transport
    from moe_hpc.device.backend import Backend
    with pytest.raises(ConfigError, match=r"run.transport = 'ipc' needs the GPU backend"):
        make_transport("ipc", None, 64, Backend("cpu", np))


# ------------------------------------------------------------- the transport's glue, one rank

class _Heap:
    """Fake device memory: one host byte array; a "device pointer" is an offset into it (+ 4096,
    so no pointer is 0)."""
    BASE = 4096

    def __init__(self, nbytes=1 << 20):
        self.bytes, self.top = np.zeros(nbytes, np.uint8), self.BASE

    def malloc(self, n):
        ptr, self.top = self.top, self.top + -(-n // 256) * 256
        return ptr

    def view(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return _Dev(self, self.bytes[ptr - self.BASE:ptr - self.BASE + n].view(dtype).reshape(shape))


class _Dev(np.ndarray):
    """A host array that answers ``.data.ptr`` with its fake device address."""

    def __new__(cls, heap, array):
        out = array.view(cls)
        out.heap = heap
        return out

    def __array_finalize__(self, obj):
        self.heap = getattr(obj, "heap", None)

    @property
    def data(self):
        from types import SimpleNamespace
        origin = self.heap.bytes.__array_interface__["data"][0]
        return SimpleNamespace(ptr=self.__array_interface__["data"][0] - origin + _Heap.BASE)


def _fake_gpu(monkeypatch):
    """A Backend whose xp is just enough CuPy over a _Heap, and the three kernels as NumPy."""
    from types import SimpleNamespace

    from moe_hpc.device import peer_rows
    heap, calls = _Heap(), []

    def memset(ptr, value, n):
        heap.bytes[ptr - heap.BASE:ptr - heap.BASE + n] = value

    def memcpy(dst, src, n, kind, stream):
        heap.bytes[dst - heap.BASE:dst - heap.BASE + n] = heap.bytes[src - heap.BASE:src - heap.BASE + n].copy()
        calls.append("copy-out")

    runtime = SimpleNamespace(malloc=heap.malloc, memset=memset, deviceSynchronize=lambda: None, free=lambda p: None,
                              ipcGetMemHandle=lambda p: b"h%d" % p, ipcOpenMemHandle=lambda h: int(h[1:]),
                              ipcCloseMemHandle=lambda p: None, memcpyAsync=memcpy)
    cuda = SimpleNamespace(runtime=runtime, UnownedMemory=lambda ptr, size, owner: ptr,
                           MemoryPointer=lambda mem, off: mem + off)
    xp = SimpleNamespace(cuda=cuda, asarray=np.asarray,
                         ndarray=lambda shape, dtype, memptr: heap.view(memptr, shape, dtype))

    class Stream:
        ptr = 0

        def wait_event(self, event):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    backend = SimpleNamespace(name="gpu", xp=xp, new_stream=lambda high_priority=False: Stream(),
                              record=lambda stream=None: "event", current_stream=lambda: Stream())

    def flags(bases, rank):
        return heap.view(int(bases[rank]), (3,), np.uint64)       # one rank: READY, DONE, ARRIVE

    def ready(bases, me, peers, seq):
        flags(bases, me)[me] = seq
        calls.append("ready")

    def put(src, bases, area, table, blocks, me, peers, seq):
        assert flags(bases, me)[0] >= seq, "put before every peer was ready"
        rb = src.shape[1] * src.dtype.itemsize
        for p, s, d, n in np.asarray(table).T:
            dst = int(bases[p]) + area + int(d) * rb
            heap.bytes[dst - heap.BASE:dst - heap.BASE + int(n) * rb] = src[s:s + n].view(np.uint8).reshape(-1)
        flags(bases, me)[peers + me] = seq
        calls.append("put")

    def wait(bases, me, peers, seq):
        assert flags(bases, me)[peers] >= seq, "waited past a transfer that had not arrived"
        calls.append("wait")

    monkeypatch.setattr(peer_rows, "signal_ready", ready)
    monkeypatch.setattr(peer_rows, "put_rows", put)
    monkeypatch.setattr(peer_rows, "wait_done", wait)
    return backend, heap, calls


class _OneRank(_Comm):
    def __init__(self):
        super().__init__(1, 1)

    def allgather(self, x):
        return [x]

    def Alltoall(self, send, recv):
        recv[...] = send

    def Barrier(self):
        pass


def test_one_rank_transfers_land_in_the_exchange_buffers_and_come_back(monkeypatch):
    """The transport's host glue on fake device memory: mapped receive buffers, prepared tables,
    growth at prepare, a transfer into an unmapped buffer (spare area, then one copy out)."""
    from moe_hpc.comm.exchange import Exchange
    from moe_hpc.comm.ipc import IpcTransport
    from moe_hpc.device.dtypes import BF16
    backend, heap, calls = _fake_gpu(monkeypatch)
    H, rng = 8, np.random.default_rng(9)
    transport = IpcTransport(_OneRank(), H, backend)
    ex = Exchange(_OneRank(), H, backend, transport)
    lay = layouts(1, 3, 3, np.random.default_rng(4))[0]
    peer, slots = lay.sends[0], lay.receives[0]
    assert slots.extent > transport.capacity                # prepare must grow the regions
    route, = ex.prepare([(peer, slots)])
    assert transport.capacity >= slots.extent
    send = heap.view(heap.malloc(peer.rows * H * 2), (peer.rows, H), BF16)
    send[...] = rng.standard_normal((peer.rows, H)).astype(BF16)
    recv = ex.buffer("dispatch-recv", 1, slots.extent)
    assert transport._area_of(recv) == 1                    # the mapped dispatch slot 1
    rows = ex.post(send, peer, recv, slots, route).wait()
    expected = np.zeros((slots.extent, H), BF16)
    scatter = slots.peer_major_scatter()
    expected[np.arange(peer.rows) if scatter is None else scatter] = np.asarray(send)
    live = slots.counts.sum(axis=0) > 0                     # padding rows are never written
    for s in np.nonzero(live)[0]:
        a, n = int(slots.offsets[0, s]), int(slots.counts[0, s])
        np.testing.assert_array_equal(np.asarray(rows)[a:a + n], expected[a:a + n])
    back = ex.buffer("combine-recv", 0, peer.rows)
    assert transport._area_of(back) == 2
    np.testing.assert_array_equal(np.asarray(ex.post(rows, slots, back, peer, route).wait()), np.asarray(send))
    assert calls == ["ready", "put", "wait"] * 2
    # an unmapped receive buffer: lands in the spare area, copied out once
    elsewhere = heap.view(heap.malloc(peer.rows * H * 2), (peer.rows, H), BF16)
    ex.post(send, peer, elsewhere, peer).wait()             # unprepared: its own offsets exchange
    np.testing.assert_array_equal(np.asarray(elsewhere), np.asarray(send))
    assert calls[-1] == "copy-out" and transport.seq == 3
