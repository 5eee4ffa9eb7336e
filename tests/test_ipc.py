"""The ``ipc`` transport's host side, on the CPU: its block tables, offsets exchange and region
arithmetic, checked by simulating every rank with NumPy (the put kernel's twin is one slice
assignment per table block) against the MPI transports' way of moving the same rows (land peer
by peer, then scatter).  The device side runs in tests/test_gpu.py."""
import numpy as np
import pytest

from moe_hpc.comm.exchange import displacements
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
    assert grown_capacity(64, 64) == 64
    assert grown_capacity(64, 65) == 96
    assert grown_capacity(64, 500) == 504
    assert grown_capacity(8, 1) == 8


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
