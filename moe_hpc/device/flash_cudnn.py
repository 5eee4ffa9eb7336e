"""Flash attention on tensor cores through cuDNN's own Python API (``nvidia-cudnn-frontend``).

Why this library: cuDNN's fused SDPA kernel is what PyTorch itself calls on Hopper, it keeps the
softmax statistics in fp32 and never holds an [L, L] score matrix, and its frontend is a small
wheel over the cuDNN runtime the CUDA wheels already carry -- no second array framework. The
graph takes strided tensors, so q, k and v are read in place from the one fused QKV GEMM's
output [S, L, (nh + 2 kv) D] and the output is written as [S, L, nh, D], the layout the output
projection wants: no transposes, no copies.

Padding needs no mask: causality keeps every padded key out of every valid query, and padded
query rows are zeroed by the caller (their values are finite, never read).

Imported only on the GPU path; ``flash_attention_or_reason`` says why it cannot be used.
"""
from __future__ import annotations

import importlib
import sys

import cupy as cp


class CudnnAttention:
    """Causal SDPA, bf16 in and out, fp32 softmax; one graph per shape, built once and cached."""

    def __init__(self, strict: bool = False):
        """strict: a shape cuDNN refuses is an error (``run.attention = cudnn``), not a fallback."""
        import cudnn
        self.strict = strict
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        self.graphs: dict[tuple, tuple] = {}
        self.workspace = cp.empty(0, cp.uint8)

    def __call__(self, qkv, out, nh: int, nkv: int, D: int, scale: float) -> None:
        """qkv: [S, L, (nh + 2 nkv) D] bf16 (q, k, v heads side by side per row, RoPE applied);
        out: [S, L, nh D] bf16, written in place. Query head h reads key/value head h // (nh/nkv)."""
        S, L, W = qkv.shape
        if W != (nh + 2 * nkv) * D or not (qkv.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError(f"cuDNN attention: qkv {qkv.shape} is not contiguous [S, L, (nh + 2 kv) D] "
                             f"for {nh}/{nkv} heads of {D}")
        graph, q, k, v, o, size = self._graph(S, L, nh, nkv, D, scale)
        if self.workspace.nbytes < size:
            self.workspace = cp.empty(size, cp.uint8)
        self.cudnn.set_stream(handle=self.handle, stream=cp.cuda.get_current_stream().ptr)
        base, step = qkv.data.ptr, 2 * D      # bytes: bf16
        pack = {q: base, k: base + nh * step, v: base + (nh + nkv) * step, o: out.data.ptr}
        graph.execute(pack, self.workspace.data.ptr, handle=self.handle)

    def supports(self, S: int, L: int, nh: int, nkv: int, D: int, scale: float) -> bool:
        """Whether cuDNN runs this shape (builds its graph once; says once on stderr why not)."""
        key = (S, L, nh, nkv, D, scale)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._build(*key)
            except Exception as e:    # cuDNN's own words: head size, alignment, GPU generation
                if self.strict:
                    raise RuntimeError(f"run.attention = 'cudnn': cuDNN does not run {S} x {L} tokens, "
                                       f"{nh}/{nkv} heads of {D}: {e}") from None
                self.graphs[key] = None
                print(f"warning: cuDNN attention does not run {S} x {L} tokens, {nh}/{nkv} heads of {D} "
                      f"({e}); those use the tiled core", file=sys.stderr, flush=True)
        return self.graphs[key] is not None

    def _graph(self, S: int, L: int, nh: int, nkv: int, D: int, scale: float):
        if not self.supports(S, L, nh, nkv, D, scale):
            raise ValueError(f"cuDNN attention cannot run shape {(S, L, nh, nkv, D)}")
        return self.graphs[(S, L, nh, nkv, D, scale)]

    def _build(self, S, L, nh, nkv, D, scale):
        c = self.cudnn
        bf16 = c.data_type.BFLOAT16
        W = (nh + 2 * nkv) * D
        g = c.pygraph(io_data_type=bf16, intermediate_data_type=c.data_type.FLOAT,
                      compute_data_type=c.data_type.FLOAT, handle=self.handle)
        # logical [S, heads, L, D] over the physical rows of the fused QKV buffer
        strided = lambda name, heads: g.tensor(name=name, dim=[S, heads, L, D], stride=[L * W, D, W, 1],
                                               data_type=bf16)
        q, k, v = strided("q", nh), strided("k", nkv), strided("v", nkv)
        o, _ = g.sdpa(name="sdpa", q=q, k=k, v=v, is_inference=True, attn_scale=scale, use_causal_mask=True)
        o.set_output(True).set_dim([S, nh, L, D]).set_stride([L * nh * D, D, nh * D, 1]).set_data_type(bf16)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([c.heur_mode.A, c.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        return g, q, k, v, o, g.get_workspace_size()


def flash_attention_or_reason(strict: bool = False) -> tuple[CudnnAttention | None, str]:
    """(the attention, "") where cuDNN's frontend imports and its runtime loads; else (None, why)."""
    try:
        importlib.import_module("cudnn")      # nvidia-cudnn-frontend
    except ImportError as e:
        return None, (f"cuDNN's Python frontend is not importable ({e}); install the gpu extra "
                      "(nvidia-cudnn-frontend and the nvidia-cudnn wheel for the CuPy wheel's CUDA)")
    try:
        return CudnnAttention(strict), ""
    except Exception as e:   # the runtime library missing or too old for this GPU
        return None, f"cuDNN's frontend imported but could not start: {e}"


__all__ = ["CudnnAttention", "flash_attention_or_reason"]
