"""How the GPU batches a rank's expert GEMMs when the experts' row counts differ (host logic,
testable without a GPU; ``kernels_cuda.grouped_expert_mlp`` follows it)."""
from __future__ import annotations

import numpy as np

# Tails of one window size cost three launches (two GEMMs, the activation) and two small
# uploads: about 130 us of host time, and after a step's counts reach the host the GPU waits on
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

    counts: [S] host ints (rows per slot, <= capacity, a multiple of SLOT_ROUND) -> (m, the
    heavy slots' indices). ``m`` (a multiple of SLOT_ROUND) minimises padded rows + tail rows +
    a launch's worth per window size: with balanced counts it is the busiest slot (one GEMM, as
    before); under skew, one hot expert no longer pads every slot to its count (a 7x slowdown
    seen on a randomly routed 8-block model)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return 0, np.zeros(0, np.int64)
    candidates = np.unique(np.minimum(_round_up(counts), capacity))
    over = lambda m: counts > m
    cost = [counts.size * m + _tail_cost(counts[over(m)], m, capacity) for m in candidates]
    m = int(candidates[int(np.argmin(cost))])
    return m, np.nonzero(over(m))[0]


def _tail_cost(counts, m: int, capacity: int) -> int:
    """Rows the tails' GEMMs run over plus a launch's worth per window size (the windows of one
    size are one GEMM, activation, GEMM)."""
    sizes = tail_windows(counts, m, capacity)[1]
    return int(sizes.sum()) + BATCH_LAUNCH_ROWS * len(np.unique(sizes))


def tail_windows(counts, m: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each heavy slot's tail GEMM: (first row, rows) per slot of ``counts`` (each
    > m). The window covers the rows past m, its size SLOT_ROUND times 1-7 or 4-7 times a power
    of two (at most a quarter more than the rows past m; or the whole slot), moved back over rows the batched GEMM already did, or on into the slot's
    padding, so it fits the slot: a GEMM then sees one of a handful of shapes, which cuBLAS has
    chosen a kernel for before (rows recomputed give the same values; padding rows are never
    read)."""
    counts = np.asarray(counts, dtype=np.int64)
    units = -(-np.maximum(counts - m, 1) // SLOT_ROUND)
    step = 2 ** np.maximum(np.floor(np.log2(units)).astype(np.int64) - 2, 0)    # four sizes an octave
    size = np.minimum(-(-units // step) * step * SLOT_ROUND, capacity)
    start = np.minimum(m, capacity - size)
    return start, size


__all__ = ["batched_rows", "tail_windows", "BATCH_LAUNCH_ROWS", "SLOT_ROUND"]
