"""CUDA graphs of generation's decode steps on one GPU rank (``run.cuda_graphs``).

A decode step launches some 800 small kernels (eight blocks' projections, RoPE, the cache
write, the attention, the gate, the experts, the combine) for a few milliseconds of GPU
work; launched one by one from Python, the launches, not the GPU, set the pace. Here a step
of a batch size seen twice in a row is captured once (``Engine.fixed_shape_decode``: shapes
fixed by the batch size, nothing read back to the host inside) and replayed as one graph:
only the step's inputs (tokens, cache rows, positions) travel before it and its logits after.

Captured work keeps its addresses, so it allocates from a pool of its own that nothing else
uses: what a step frees there is reused only by later captures and replays, which run one at
a time on one stream. A graph holds the KV cache's addresses: reopening the cache drops them.
"""
from __future__ import annotations

import sys

import numpy as np

from ..model.blocks import CacheAt

MAX_GRAPH_BATCH = 128      # the fixed-shape experts run every expert over the batch: past this, compute-bound


class DecodeGraphs:
    """engine: an Engine whose ``can_capture_decode`` holds; cp: CuPy."""

    def __init__(self, engine, cp):
        self.engine, self.cp = engine, cp
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, tuple] = {}       # batch size -> (graph, device inputs, device logits)
        self.last_batch = None
        self.failed = None                       # why capture failed: the rest of the run steps eagerly

    def clear(self) -> None:
        self.graphs.clear()
        self.last_batch = None

    def step(self, tokens: np.ndarray, rows: np.ndarray, positions: np.ndarray):
        """One decode step of B sequences (host ints [B] each) -> fp32 logits [B, V] on the host,
        or None where the caller steps eagerly (a batch size not seen twice in a row yet, too
        large, or capture failed)."""
        B = len(rows)
        repeated, self.last_batch = B == self.last_batch, B
        if self.failed or not 0 < B <= MAX_GRAPH_BATCH:
            return None
        host = [np.ascontiguousarray(a, dtype=np.int64) for a in (tokens, rows, positions)]
        if B in self.graphs:
            return self._replay(B, host)
        return self._capture(B, host) if repeated else None

    def _forward(self, inputs):
        tokens, rows, positions = inputs
        return self.engine.fixed_shape_decode(tokens, CacheAt(rows, positions))

    def _after_default_stream(self) -> None:
        """Our stream starts after the work already queued on the default one (the cache's fill)."""
        self.stream.wait_event(self.cp.cuda.Stream.null.record())

    def _capture(self, B: int, host):
        """Run this step eagerly on the graph's stream and pool (its result is this step's; it
        also compiles every kernel and fills the pool), then capture the same step."""
        cp = self.cp
        inputs = tuple(cp.asarray(a) for a in host)
        self._after_default_stream()
        with self.stream, cp.cuda.using_allocator(self.pool.malloc):
            logits = cp.asnumpy(self._forward(inputs), stream=self.stream)
            try:
                self.stream.begin_capture()
                try:
                    out = self._forward(inputs)
                finally:
                    graph = self.stream.end_capture()
            except Exception as err:      # noqa: BLE001 - any capture failure leaves eager stepping
                self.failed = f"{type(err).__name__}: {err}"
                print(f"warning: decode steps run eagerly: capturing a CUDA graph failed ({self.failed})",
                      file=sys.stderr, flush=True)
                return logits
        self.graphs[B] = (graph, inputs, out)
        return logits

    def _replay(self, B: int, host):
        graph, inputs, out = self.graphs[B]
        self._after_default_stream()
        for buf, a in zip(inputs, host):
            buf.set(a, stream=self.stream)
        graph.launch(self.stream)
        return self.cp.asnumpy(out, stream=self.stream)


__all__ = ["DecodeGraphs", "MAX_GRAPH_BATCH"]
