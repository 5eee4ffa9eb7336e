"""How the GPU batches a rank's expert GEMMs when the experts' row counts differ (host logic,
testable without a GPU; ``kernels_cuda.grouped_expert_mlp`` follows it)."""
from __future__ import annotations

import numpy as np

# Tails of one window size cost three launches (two GEMMs, the activation) and three small
# uploads (two pointer arrays, the window table): about 130 us of host time, and after a step's counts reach the host the GPU waits on
# it; 1,024 rows of one expert's GEMM work at the 61-layer preset's shapes take about as long on
# an H200 (docs/performance.md).
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


__all__ = ["batched_rows", "tail_windows", "BATCH_LAUNCH_ROWS", "SLOT_ROUND"]
