"""CUDA graphs of generation's decode steps on one GPU rank (``run.cuda_graphs``).

A decode step launches some 800 small kernels (eight blocks' projections, RoPE, the cache
write, the attention, the gate, the experts, the combine) for a few milliseconds of GPU
work; launched one by one from Python, the launches, not the GPU, set the pace. Here a step
of a batch size seen twice in a row is captured once (``Engine.fixed_shape_decode``: shapes
fixed by the batch size, nothing read back to the host inside) and replayed as one graph:
only the step's inputs (tokens, cache rows, positions) travel, inside the graph from page-locked
host memory, and its logits come back the same way.

Captured work keeps its addresses, so it allocates from a pool of its own that nothing else
uses: what a step frees there is reused only by later captures and replays, which run one at
a time on one stream. That pool must never hand its cached blocks back to the device while a
graph may still replay into them (CuPy's pool does, to retry an allocation the device
refused): its allocator reports a refusal as out-of-memory instead, so a capture that does not
fit fails, and the run steps eagerly. A graph holds the KV cache's addresses: reopening the
cache drops the graphs and frees their pool.

The fixed-shape experts read every expert of a block where an eager step reads only those
chosen (min(E, B x top_k)); a replay saves the launches of ~400 kernels, which at batch 64 cost
more than the GPU work itself. Small batches on models whose experts are large were not
measured: ``run.cuda_graphs = false`` steps eagerly.
"""
from __future__ import annotations

import sys
import time
from collections import deque

import numpy as np

from ..model.blocks import CacheAt

MAX_GRAPH_BATCH = 128      # the fixed-shape experts run every expert over the batch: past this, compute-bound


class DecodeGraphs:
    """engine: an Engine whose ``can_capture_decode`` holds; cp: CuPy."""

    def __init__(self, engine, cp):
        self.engine, self.cp = engine, cp
        self.pool = cp.cuda.MemoryPool(_refusal_is_out_of_memory(cp))
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, tuple] = {}       # batch size -> (graph, pinned inputs, pinned logits, device both)
        self.last_batch = None
        self.failed = None                       # why capture failed: the rest of the run steps eagerly
        self.launch_s = deque(maxlen=4096)       # host seconds of the last replays' launch calls (the bench reports them)

    def clear(self) -> None:
        """Drop every graph and give their memory back (replays are finished: each ends in a
        host synchronisation)."""
        self.graphs.clear()
        self.last_batch = None
        self.pool.free_all_blocks()

    def step(self, tokens: np.ndarray, rows: np.ndarray, positions: np.ndarray):
        """One decode step of B sequences (host ints [B] each) -> fp32 logits [B, V] on the host,
        or None where the caller steps eagerly (a batch size not seen twice in a row yet, too
        large, or capture failed)."""
        B = len(rows)
        repeated, self.last_batch = B == self.last_batch, B
        if self.failed or not 0 < B <= MAX_GRAPH_BATCH:
            return None
        host = np.stack([np.asarray(a, dtype=np.int64) for a in (tokens, rows, positions)])     # [3, B]
        if B in self.graphs:
            return self._replay(B, host)
        return self._capture(B, host) if repeated else None

    def _forward(self, inputs):
        tokens, rows, positions = inputs
        return self.engine.fixed_shape_decode(tokens, CacheAt(rows, positions))

    def _copy(self, dst: int, src: int, nbytes: int, direction: str) -> None:
        """An asynchronous copy on the graph's stream through the runtime itself: CuPy's own
        copies refuse a capturing stream, which is right for pageable memory but not for pinned."""
        rt = self.cp.cuda.runtime
        kind = rt.memcpyHostToDevice if direction == "to device" else rt.memcpyDeviceToHost
        rt.memcpyAsync(dst, src, nbytes, kind, self.stream.ptr)

    def _pinned(self, shape, dtype) -> np.ndarray:
        """A host array in page-locked memory: a graph may copy to and from it (a capture refuses
        pageable memory), and the copies need no staging through the driver's own buffer."""
        dtype = np.dtype(dtype)
        mem = self.cp.cuda.alloc_pinned_memory(max(1, int(np.prod(shape)) * dtype.itemsize))
        return np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)

    def _after_default_stream(self) -> None:
        """Our stream starts after the work already queued on the caller's (the cache's fill)."""
        self.stream.wait_event(self.cp.cuda.get_current_stream().record())

    def _capture(self, B: int, host):
        """Run this step eagerly on the graph's stream and pool (its result is this step's; it
        also compiles every kernel and fills the pool), then capture the same step between a
        copy of its inputs from pinned host memory and a copy of its logits back: a replay is
        then one launch, with no copy calls of its own around it."""
        cp = self.cp
        self._after_default_stream()
        try:
            with self.stream, cp.cuda.using_allocator(self.pool.malloc):
                inputs = cp.asarray(host)
                logits = cp.asnumpy(self._forward(inputs), stream=self.stream)
                pinned_in, pinned_out = self._pinned(host.shape, np.int64), self._pinned(logits.shape, logits.dtype)
                self.stream.begin_capture()
                try:
                    self._copy(inputs.data.ptr, pinned_in.ctypes.data, pinned_in.nbytes, "to device")
                    out = self._forward(inputs)
                    self._copy(pinned_out.ctypes.data, out.data.ptr, pinned_out.nbytes, "to host")
                finally:
                    graph = self.stream.end_capture()
        except Exception as err:      # noqa: BLE001 - any failure here leaves eager stepping
            self._give_up(err)
            return None               # the caller runs this step eagerly (its cache writes repeat)
        # the device arrays are kept with the graph: it replays into their addresses
        self.graphs[B] = (graph, pinned_in, pinned_out, inputs, out)
        return logits

    def _give_up(self, err: Exception) -> None:
        self.failed = f"{type(err).__name__}: {err}"
        self.clear()
        print(f"warning: decode steps run eagerly: capturing a CUDA graph failed ({self.failed})",
              file=sys.stderr, flush=True)

    def _replay(self, B: int, host):
        graph, pinned_in, pinned_out = self.graphs[B][:3]
        self._after_default_stream()
        pinned_in[...] = host            # the last replay has finished: it ended in a synchronisation
        t0 = time.perf_counter()
        graph.launch(self.stream)
        self.launch_s.append(time.perf_counter() - t0)
        self.stream.synchronize()
        return pinned_out.copy()


def _refusal_is_out_of_memory(cp):
    """A base allocator for the graphs' pool: the device's memory, with a refusal raised as
    out-of-memory, which CuPy's pool passes on instead of freeing its cached blocks (blocks
    that captured graphs replay into) and retrying."""
    def allocate(size: int):
        try:
            return cp.cuda.memory.MemoryPointer(cp.cuda.memory.Memory(size), 0)
        except cp.cuda.runtime.CUDARuntimeError as err:
            raise cp.cuda.memory.OutOfMemoryError(size, 0, 0) from err
    return allocate


__all__ = ["DecodeGraphs", "MAX_GRAPH_BATCH"]
