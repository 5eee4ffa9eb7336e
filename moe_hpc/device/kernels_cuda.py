"""CUDA versions of ``kernels``: bf16 handled as raw 16-bit words so no kernel depends on a
compiler's bf16 support; conversions round to nearest even, like ml_dtypes.

Imported only when a CuPy array reaches ``kernels``.
"""
from __future__ import annotations

import contextlib
import functools

import cupy as cp
import numpy as np

from .dtypes import BF16

_BF16_HELPERS = r"""
__device__ __forceinline__ float bf2f(unsigned short u) {
    return __uint_as_float(((unsigned int)u) << 16);
}
__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;           // NaN stays NaN
    x += 0x7fffu + ((x >> 16) & 1u);                               // round to nearest even
    return (unsigned short)(x >> 16);
}
"""

_ACTIVATIONS = {
    "gelu": "0.5f * v * (1.0f + erff(v * 0.70710678118654752f))",
    "gelu_tanh": "0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)))",
    "silu": "v / (1.0f + expf(-v))",
}


def _u16(a):
    return a.view(cp.uint16)


@functools.lru_cache(maxsize=None)
def _bias_act_kernel(kind: str, has_bias: bool):
    # h is [slots * C, F]; slot i / CF uses bias row b1[slot]
    bias = "v += bf2f(b1[(i / CF) * F + i % F]);" if has_bias else ""
    return cp.ElementwiseKernel(
        "raw uint16 b1, int64 F, int64 CF", "uint16 h",
        f"float v = bf2f(h); {bias} v = {_ACTIVATIONS[kind]}; h = f2bf(v);",
        f"moe_bias_act_{kind}_{int(has_bias)}", preamble=_BF16_HELPERS)


@functools.lru_cache(maxsize=None)
def _combine_kernel(k: int, has_b2: bool):
    b2 = "v += bf2f(b2[(long long)ex[t * K + j] * H + h]);" if has_b2 else ""
    return cp.ElementwiseKernel(
        "raw uint16 rows, raw int64 pos, raw float32 w, raw int32 ex, raw uint16 b2, int64 H",
        "uint16 out",
        f"""
        const int K = {k};
        long long t = i / H, h = i - t * H;
        float acc = 0.0f;
        for (int j = 0; j < K; ++j) {{
            float v = bf2f(rows[pos[t * K + j] * H + h]);
            {b2}
            acc += w[t * K + j] * v;
        }}
        out = f2bf(acc);
        """, f"moe_combine_{k}_{int(has_b2)}", preamble=_BF16_HELPERS)


_COPY_ROWS = cp.RawKernel(r"""
extern "C" __global__ void moe_copy_rows(const uint4* src, const long long* src_rows,
                                         uint4* dst, const long long* dst_rows, int row_vecs) {
    // one block per row; 16-byte vectors; a null index means "row i itself"
    long long i = blockIdx.x;
    long long s = src_rows ? src_rows[i] : i, d = dst_rows ? dst_rows[i] : i;
    const uint4* from = src + s * row_vecs;
    uint4* to = dst + d * row_vecs;
    for (int v = threadIdx.x; v < row_vecs; v += blockDim.x) to[v] = from[v];
}
""", "moe_copy_rows")

_COMBINE_ROWS = cp.RawKernel(_BF16_HELPERS + r"""
extern "C" __global__ void moe_combine_rows(const unsigned short* rows, const long long* pos,
        const float* w, const int* ex, const unsigned short* b2, int K, int H,
        unsigned short* out) {
    // one block per token; each thread sums 8 consecutive features of the K chosen rows
    long long t = blockIdx.x;
    for (int h = threadIdx.x * 8; h < H; h += blockDim.x * 8) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j = 0; j < K; ++j) {
            uint4 v = *(const uint4*)(rows + pos[t * K + j] * H + h);
            const unsigned short* r = (const unsigned short*)&v;
            float wj = w[t * K + j];
            if (b2) {
                uint4 bv = *(const uint4*)(b2 + (long long)ex[t * K + j] * H + h);
                const unsigned short* bb = (const unsigned short*)&bv;
                for (int q = 0; q < 8; ++q) acc[q] += wj * (bf2f(r[q]) + bf2f(bb[q]));
            } else {
                for (int q = 0; q < 8; ++q) acc[q] += wj * bf2f(r[q]);
            }
        }
        uint4 o;
        unsigned short* oo = (unsigned short*)&o;
        for (int q = 0; q < 8; ++q) oo[q] = f2bf(acc[q]);
        *(uint4*)(out + t * H + h) = o;
    }
}
""", "moe_combine_rows")


def move_rows(src, dst, src_rows=None, dst_rows=None) -> None:
    """Row copy for any 2-D array: the vector kernel where rows are 16-byte multiples."""
    if src.shape[1] * src.dtype.itemsize % 16 == 0 and src.flags.c_contiguous and dst.flags.c_contiguous:
        return copy_rows(src, dst, src_rows, dst_rows,
                         count=None if src_rows is not None or dst_rows is not None else src.shape[0])
    words = lambda a: a.view(cp.uint16)
    picked = words(src) if src_rows is None else words(src)[src_rows]
    if dst_rows is None:
        words(dst)[...] = picked
    else:
        words(dst)[dst_rows] = picked


def copy_rows(src, dst, src_rows=None, dst_rows=None, count=None) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] for whole rows (16-bit elements, row bytes a multiple
    of 16); a missing index means the identity. Rows are copied with 16-byte vectors."""
    n = int(count if count is not None else (src_rows if src_rows is not None else dst_rows).size)
    if n == 0:
        return
    width = src.shape[1] * src.dtype.itemsize
    idx = lambda r: np.uint64(0) if r is None else cp.ascontiguousarray(r, dtype=cp.int64)
    _COPY_ROWS((n,), (128,), (src, idx(src_rows), dst, idx(dst_rows), np.int32(width // 16)))


_TOPK = cp.RawKernel(r"""
#define MAXK 8
extern "C" __global__ void moe_topk(const float* score, const float* probs, int T, int E, int K,
                                    int normalize, int* experts, float* weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* s = score + (long long)t * E;
    int best[MAXK]; float top[MAXK];
    for (int j = 0; j < K; ++j) { best[j] = -1; top[j] = 0.0f; }
    for (int e = 0; e < E; ++e) {
        float v = s[e];
        if (best[K - 1] >= 0 && !(v > top[K - 1])) continue;   // ties keep the lower index
        int j = K - 1;
        while (j > 0 && (best[j - 1] < 0 || v > top[j - 1])) { top[j] = top[j - 1]; best[j] = best[j - 1]; --j; }
        top[j] = v; best[j] = e;
    }
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) sum += probs[(long long)t * E + best[j]];
    for (int j = 0; j < K; ++j) {
        float p = probs[(long long)t * E + best[j]];
        experts[(long long)t * K + j] = best[j];
        weights[(long long)t * K + j] = normalize ? p / sum : p;
    }
}
""", "moe_topk")


def topk(score, probs, k: int, normalize: bool):
    if k > 8:
        raise ValueError("the GPU top-k kernel handles top_k <= 8")
    T, E = score.shape
    experts = cp.empty((T, k), dtype=cp.int32)
    weights = cp.empty((T, k), dtype=cp.float32)
    if T:
        _TOPK(((T + 255) // 256,), (256,), (cp.ascontiguousarray(score, dtype=cp.float32),
              cp.ascontiguousarray(probs, dtype=cp.float32), np.int32(T), np.int32(E), np.int32(k),
              np.int32(normalize), experts, weights))
    return experts, weights


@contextlib.contextmanager
def _cublas_on_current_stream():
    """(cublas module, handle, alpha = 1, beta = 0): the handle on the current stream, scalars
    read from host memory; the handle's pointer mode is restored afterwards."""
    from cupy_backends.cuda.libs import cublas
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        yield cublas, handle, one.ctypes.data, zero.ctypes.data
    finally:
        cublas.setPointerMode(handle, mode)


def matmul_f32out(a, b):
    """bf16 x bf16 -> fp32 through cublasGemmEx (row-major: C^T = B^T A^T)."""
    a, b = cp.ascontiguousarray(a), cp.ascontiguousarray(b)
    m, kdim = a.shape
    n = b.shape[1]
    out = cp.empty((m, n), dtype=cp.float32)
    if m == 0:
        return out
    with _cublas_on_current_stream() as (cublas, handle, one, zero):
        cublas.gemmEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, n, m, kdim,
                      one, b.data.ptr, 14, n, a.data.ptr, 14, kdim,   # 14: CUDA_R_16BF
                      zero, out.data.ptr, 0, n,                      # 0: CUDA_R_32F
                      cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
    return out


def _bias_act(h, b1, kind: str, rows_per_slot: int) -> None:
    F = h.shape[1]
    empty = cp.empty(0, dtype=cp.uint16)
    _bias_act_kernel(kind, b1 is not None)(empty if b1 is None else _u16(b1), F,
                                           max(rows_per_slot, 1) * F, _u16(h))


def expert_mlp(x, w1, b1, w2, kind: str, hidden=None, out=None):
    if x.shape[0] == 0:
        return out if out is not None else cp.empty((0, w2.shape[1]), BF16)
    h = cp.matmul(x, w1, out=hidden)            # bf16 operands, fp32 accumulate (cuBLAS)
    _bias_act(h, b1, kind, x.shape[0])
    return cp.matmul(h, w2, out=out)


def _batched_gemm(a, b, c, slots: int) -> None:
    """c[s] = a[s] @ b[s] for s < slots; a: [S*C, K], b: [S, K, N] bf16; c: [S*C, N] bf16 or fp32.

    cuBLAS is column-major, so it computes c^T = b^T a^T with the operands swapped."""
    C, K, N = a.shape[0] // slots, b.shape[1], b.shape[2]
    ctype = 0 if c.dtype == cp.float32 else 14                       # CUDA_R_32F or CUDA_R_16BF
    with _cublas_on_current_stream() as (cublas, handle, one, zero):
        cublas.gemmStridedBatchedEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, N, C, K,
                                    one, b.data.ptr, 14, N, K * N,
                                    a.data.ptr, 14, K, C * K, zero,
                                    c.data.ptr, ctype, N, C * N, slots,
                                    cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)


def grouped_expert_mlp(x, counts, w1, b1, w2, kind: str, hidden, out):
    S = len(counts)
    if S == 0 or x.shape[0] == 0:
        return out
    _batched_gemm(x, w1, hidden, S)
    _bias_act(hidden, b1, kind, x.shape[0] // S)
    _batched_gemm(hidden, w2, out, S)
    return out


def combine(rows, positions, weights, experts=None, b2=None, out=None):
    T, k = positions.shape
    H = rows.shape[1]
    if out is None:
        out = cp.empty((T, H), dtype=BF16)
    if T == 0:
        return out
    has_b2 = b2 is not None
    if H % 8 == 0 and rows.flags.c_contiguous and out.flags.c_contiguous:
        _COMBINE_ROWS((T,), (128,), (_u16(rows), cp.ascontiguousarray(positions, dtype=cp.int64),
                      cp.ascontiguousarray(weights, dtype=cp.float32),
                      cp.ascontiguousarray(experts, dtype=cp.int32) if has_b2 else np.uint64(0),
                      _u16(b2) if has_b2 else np.uint64(0), np.int32(k), np.int32(H), _u16(out)))
        return out
    _combine_kernel(k, has_b2)(
        _u16(rows), cp.ascontiguousarray(positions, dtype=cp.int64),
        cp.ascontiguousarray(weights, dtype=cp.float32),
        cp.ascontiguousarray(experts, dtype=cp.int32) if has_b2 else cp.empty(0, cp.int32),
        _u16(b2) if has_b2 else cp.empty(0, cp.uint16), H, _u16(out).reshape(-1))
    return out
