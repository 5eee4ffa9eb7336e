"""Device side of the ``ipc`` transport (``comm/ipc.py``): rows written straight into peers'
buffers mapped through CUDA IPC, and the flag words that order the writes.

Every rank owns one region: flag words, then its receive areas.  ``bases`` is a device array of
uint64, the region of each rank as mapped in this process (its own at ``me``).  Flag words
(uint64, monotonic, the transfer's sequence number ``seq``; ``P`` ranks):

    READY[p] = words [0, P)      rank p has reached transfer seq: every read of its areas queued
                                 before it is done, so senders may overwrite them
    DONE[p]  = words [P, 2P)     rank p's rows of transfer seq are all in this region
    ARRIVE   = word 2P           blocks of the running put kernel that have finished (reset to 0)

One transfer is three launches on the transport's stream, every rank the same:

    ready: write READY[me] = seq into every peer's region (1 block)
    put:   wait until own READY[p] >= seq for every p, copy each table block's rows to
           bases[peer] + area, then the last block to finish (threadfence + ARRIVE counter, the
           CUDA programming guide's "last block" pattern) writes DONE[me] = seq into every peer
    wait:  spin until own DONE[p] >= seq for every p (1 block)

The put kernel has a fixed grid (``PUT_BLOCKS``): it uses that many SMs at most, leaving the rest
to the expert GEMMs.  Spins sleep (PTX ``nanosleep``) between polls.  Ranks sharing one GPU take
turns by time slicing, so each spin gives way to the other process after its slice: correct,
not fast (a correctness set-up, not a benchmark one).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

PUT_BLOCKS = 20          # SMs the put kernel may occupy (of 132 on an H100/H200), DeepEP's order
PUT_THREADS = 512        # 16 warps: one row per warp at a time, 32 x 16-byte vectors per step
FLAG_WORDS_PER_PEER = 2  # READY and DONE; plus one ARRIVE word per region

_SOURCE = r"""
typedef unsigned long long u64;
#define POLL_PAUSE() asm volatile("nanosleep.u32 256;")    /* sm_70+: back off between polls */

extern "C" __global__ void moe_peer_ready(const u64* bases, int me, int peers, u64 seq) {
    __threadfence_system();            // the reads queued before this transfer are done
    if (threadIdx.x < peers) ((volatile u64*)bases[threadIdx.x])[me] = seq;
}

extern "C" __global__ void moe_peer_wait(const u64* bases, int me, int peers, u64 seq) {
    if (threadIdx.x < peers) {
        volatile u64* done = (volatile u64*)bases[me] + peers + threadIdx.x;
        while (*done < seq) POLL_PAUSE();
    }
    __threadfence_system();
}

extern "C" __global__ void moe_peer_put(const T* __restrict__ src, const u64* __restrict__ bases, long long area,
                                        const long long* __restrict__ table, int blocks, int row_vecs,
                                        int me, int peers, u64 seq) {
    // table: [4, blocks] = destination rank, source row, destination row, rows of each block
    u64* own = (u64*)bases[me];
    if (threadIdx.x < peers) {         // every peer has armed this transfer
        volatile u64* ready = (volatile u64*)own + threadIdx.x;
        while (*ready < seq) POLL_PAUSE();
    }
    __syncthreads();
    int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int b = 0; b < blocks; ++b) {
        long long peer = table[b], s = table[blocks + b], d = table[2 * blocks + b], n = table[3 * blocks + b];
        T* dst = (T*)(bases[peer] + area) + d * row_vecs;
        const T* from = src + s * row_vecs;
        for (long long r = (long long)blockIdx.x * warps + warp; r < n; r += (long long)gridDim.x * warps)
            for (int v = lane; v < row_vecs; v += 32) dst[r * row_vecs + v] = from[r * row_vecs + v];
    }
    __threadfence_system();            // this block's rows are visible to every peer ...
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(own + 2 * peers, 1ULL) == (u64)(gridDim.x - 1);
    __syncthreads();
    if (!last) return;                 // ... and the last block tells them
    if (threadIdx.x < peers) ((volatile u64*)bases[threadIdx.x])[peers + me] = seq;
    if (threadIdx.x == 0) own[2 * peers] = 0;
}
"""


@lru_cache(maxsize=None)
def _kernels(unit: int):
    """(ready, wait, put) for rows moved in ``unit``-byte words (16: uint4 vectors, 2: words)."""
    import cupy as cp
    code = ("typedef uint4 T;" if unit == 16 else "typedef unsigned short T;") + _SOURCE
    module = cp.RawModule(code=code)
    return tuple(module.get_function(name) for name in ("moe_peer_ready", "moe_peer_wait", "moe_peer_put"))


def row_unit(row_bytes: int) -> int:
    """Bytes the kernels move at once: 16-byte vectors where a row is a multiple of 16 bytes."""
    return 16 if row_bytes % 16 == 0 else 2


def flag_words(peers: int) -> int:
    """uint64 words at the start of every region: READY[P], DONE[P], ARRIVE."""
    return FLAG_WORDS_PER_PEER * peers + 1


def signal_ready(bases, me: int, peers: int, seq: int) -> None:
    """On the current stream: tell every peer this rank has reached transfer ``seq``."""
    ready, _, _ = _kernels(16)
    ready((1,), (max(32, peers),), (bases, np.int32(me), np.int32(peers), np.uint64(seq)))


def wait_done(bases, me: int, peers: int, seq: int) -> None:
    """On the current stream: hold later work until every peer's rows of ``seq`` are here."""
    _, wait, _ = _kernels(16)
    wait((1,), (max(32, peers),), (bases, np.int32(me), np.int32(peers), np.uint64(seq)))


def put_rows(src, bases, area: int, table, blocks: int, me: int, peers: int, seq: int) -> None:
    """On the current stream: rows of ``src`` [n, H] (contiguous) into peers' areas.

    bases: [P] uint64 device, each rank's region here; area: byte offset of the receive area in
    every region; table: [4, blocks] int64 device (destination rank, source row, destination row,
    rows); then DONE[me] = seq in every peer (also when there are no rows)."""
    row_bytes = src.shape[1] * src.dtype.itemsize
    unit = row_unit(row_bytes)
    _, _, put = _kernels(unit)
    put((PUT_BLOCKS,), (PUT_THREADS,), (src, bases, np.int64(area), table, np.int32(blocks),
                                        np.int32(row_bytes // unit), np.int32(me), np.int32(peers), np.uint64(seq)))


__all__ = ["PUT_BLOCKS", "flag_words", "row_unit", "signal_ready", "wait_done", "put_rows"]
