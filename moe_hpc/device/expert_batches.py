"""How the GPU batches a rank's expert GEMMs when the experts' row counts differ (host logic,
testable without a GPU; ``kernels_cuda.grouped_expert_mlp`` follows it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Tails of one window size cost three launches (two GEMMs, the activation) and three small
# uploads (two pointer arrays, the window table): about 130 us of host time, and after a step's
# counts reach the host the GPU waits on it; 1,024 rows of one expert's GEMM work at the
# 61-layer preset's shapes take about as long on an H200 (docs/performance.md).
BATCH_LAUNCH_ROWS = 1024
# Rows: every expert slot of a receive buffer, and every row count an expert GEMM runs over, is
# a multiple of this. Few distinct shapes reach cuBLAS, so its choice of kernel for a shape is
# made once and then cached: a shape it has not seen cost 0.7 ms of host time per strided-
# batched GEMM on the H200, a cached one 34 us, and a step's skewed counts made new shapes at
# every call (tensor cores want multiples of 8 or 16; 64 buys the repetition).
SLOT_ROUND = 64


def _round_up(rows, multiple: int = SLOT_ROUND):
    return -(-rows // multiple) * multiple


def batched_rows(counts, capacity: int) -> tuple[int, np.ndarray]:
    """How the GPU splits a micro-batch's expert work: one strided-batched GEMM covers the first
    ``m`` rows of every slot, and each slot with more rows than that gets a tail GEMM of its own
    (``tail_windows``).

    counts: [S] host ints (rows per slot, <= capacity; the capacity a multiple of SLOT_ROUND) -> (m, the
    heavy slots' indices). ``m`` (a multiple of SLOT_ROUND) minimises padded rows + tail rows +
    a launch's worth per window size: with balanced counts it is the busiest slot (one GEMM, as
    before); under skew, one hot expert no longer pads every slot to its count (a 7x slowdown
    seen on a randomly routed 8-block model)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return 0, np.zeros(0, np.int64)
    # every candidate at once ([candidates, S]): the host plans this after each step's counts
    # arrive while the GPU waits, so a loop per candidate (about a millisecond at S = 64) shows
    candidates = np.unique(np.minimum(_round_up(counts), capacity))
    over = counts[None, :] > candidates[:, None]
    sizes = np.where(over, _window_sizes(counts[None, :], candidates[:, None], capacity), 0)
    cost = counts.size * candidates + sizes.sum(axis=1) + BATCH_LAUNCH_ROWS * _distinct_nonzero(sizes)
    best = int(np.argmin(cost))
    return int(candidates[best]), np.nonzero(over[best])[0]


def _distinct_nonzero(sizes: np.ndarray) -> np.ndarray:
    """[n, S] -> [n]: how many distinct non-zero values each row holds (window sizes, each one
    GEMM pair and one activation)."""
    ordered = np.sort(sizes, axis=1)
    new = np.concatenate([ordered[:, :1] > 0, (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] > 0)], axis=1)
    return new.sum(axis=1)


def _window_sizes(counts, m, capacity: int):
    """Rows of the tail window of slots of ``counts`` past ``m`` rows (broadcasts): SLOT_ROUND
    times 1-7, or 4-7 times a power of two, at least the rows past m, at most the capacity."""
    units = -(-np.maximum(counts - m, 1) // SLOT_ROUND)
    step = 2 ** np.maximum(np.floor(np.log2(units)).astype(np.int64) - 2, 0)    # four sizes an octave
    return np.minimum(-(-units // step) * step * SLOT_ROUND, capacity)


def tail_windows(counts, m: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each heavy slot's tail GEMM: (first row, rows) per slot of ``counts`` (each
    > m). The window covers the rows past m, its size SLOT_ROUND times 1-7 or 4-7 times a power
    of two (past 256 rows at most a quarter more than the rows past m, below it up to 63 more;
    or the whole slot), moved back over rows the batched GEMM already did, or on into the slot's
    padding, so it fits the slot: a GEMM then sees one of a handful of shapes, which cuBLAS has
    chosen a kernel for before (rows recomputed give the same values; padding rows are never
    read)."""
    size = _window_sizes(np.asarray(counts, dtype=np.int64), m, capacity)
    return np.minimum(m, capacity - size), size


@dataclass(frozen=True)
class PackedSlots:
    """One micro-batch's rows on a rank that moves them itself (one rank, no transport), packed
    for the GEMMs with no row but padding the GEMMs run over: the first ``m`` rows of every busy
    slot at stride m (the batched GEMMs), then each heavy slot's tail window (the rows past m,
    rounded as ``tail_windows`` rounds them). Row j of busy slot p lies at p m + j below m and at
    tail_start + j - m past it. A buffer of the busiest slot's rows for every slot held 16 GiB
    for a skewed 16,384-token step (docs/performance.md); this one holds the rows computed.

    slots: [B] the busy slots' indices, ascending; counts: [B] their rows; heavy: [h] positions
    (among the busy) of the slots with more than m rows; tail_start, tail_rows: [h] their
    windows; extent: rows the buffer spans."""
    slots: np.ndarray
    counts: np.ndarray
    m: int
    heavy: np.ndarray
    tail_start: np.ndarray
    tail_rows: np.ndarray
    extent: int

    def row_bases(self, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
        """[num_slots] (below, past): row j of slot s lies at below[s] + j for j < m and at
        past[s] + j beyond (0 for a slot with no rows)."""
        below, past = np.zeros(num_slots, np.int64), np.zeros(num_slots, np.int64)
        below[self.slots] = np.arange(self.slots.size) * self.m
        past[self.slots] = below[self.slots]
        past[self.slots[self.heavy]] = self.tail_start - self.m
        return below, past

    def slot_rows(self, p: int) -> np.ndarray:
        """The buffer rows of busy slot p, in order."""
        n, m = int(self.counts[p]), self.m
        head = np.arange(p * m, p * m + min(n, m))
        if n <= m:
            return head
        h = int(np.searchsorted(self.heavy, p))
        return np.concatenate([head, np.arange(self.tail_start[h], self.tail_start[h] + n - m)])

    def runs(self) -> list[tuple[int, int]]:
        """``consecutive_runs`` of the busy slots."""
        return consecutive_runs(self.slots)


def consecutive_runs(slots) -> list[tuple[int, int]]:
    """slots: ascending ints -> [(first, end)) positions of each run of consecutive values: one
    run's expert weights lie at one stride, so it is one batched GEMM."""
    breaks = (np.nonzero(np.diff(slots) != 1)[0] + 1).tolist()
    return list(zip([0] + breaks, breaks + [len(slots)]))


def pack_slots(counts) -> PackedSlots:
    """counts: [S] host ints, rows each slot received -> its ``PackedSlots``: m and the tail
    windows chosen as for a buffer of the busiest slot's rounded count (``batched_rows``)."""
    counts = np.asarray(counts, dtype=np.int64)
    slots = np.nonzero(counts > 0)[0]
    n = counts[slots]
    capacity = int(_round_up(n.max())) if n.size else 0
    m, heavy = batched_rows(n, capacity)
    rows = _window_sizes(n[heavy], m, capacity)
    tail_start = slots.size * m + np.cumsum(rows) - rows
    return PackedSlots(slots, n, m, heavy, tail_start, rows, int(slots.size * m + rows.sum()))


__all__ = ["batched_rows", "tail_windows", "pack_slots", "PackedSlots", "consecutive_runs", "BATCH_LAUNCH_ROWS", "SLOT_ROUND"]
