"""CUDA kernels of the dense path: RMSNorm fused with the residual add before it, the residual
add of a block's output rows, and RoPE applied in place to the query and key heads of the fused
QKV rows.

All are memory-bound: each reads and writes a row once (four elements per thread where the
row widths allow, two bytes per thread elsewhere), where the array-module version makes
four to six passes over fp32 copies. Same precision rule as everything else: bf16 words in and
out, fp32 inside; RoPE's products are rounded separately (no fused multiply-add) like NumPy's,
and the norm's sum of squares runs in another order than NumPy's, so the two agree to rounding.
"""
from __future__ import annotations

import functools

import cupy as cp

from .dtypes import BF16
from .kernels_cuda import _BF16_HELPERS

_SOURCE = _BF16_HELPERS + r"""
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? partial[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    return partial[0];
}

// One block per row. x += y (rounded to bf16, in place) when y is given; out = rmsnorm(x) * w.
extern "C" __global__ void add_rmsnorm(unsigned short* x, const unsigned short* y, int has_y,
                                       const unsigned short* w, unsigned short* out, int H, float eps) {
    size_t base = (size_t)blockIdx.x * H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = bf2f(x[base + i]);
        if (has_y) {
            unsigned short s = f2bf(__fadd_rn(v, bf2f(y[base + i])));
            x[base + i] = s;
            v = bf2f(s);
        }
        ss = __fmaf_rn(v, v, ss);
    }
    float inv = 1.0f / sqrtf(__fadd_rn(block_sum(ss) / (float)H, eps));
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        out[base + i] = f2bf(__fmul_rn(__fmul_rn(bf2f(x[base + i]), inv), bf2f(w[i])));
}

// One block per listed row: x[rows[i]] += f[i], rounded to bf16 (the residual add of a block's output).
extern "C" __global__ void add_rows(unsigned short* x, const long long* rows, const unsigned short* f, int H) {
    size_t dst = (size_t)rows[blockIdx.x] * H, src = (size_t)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        x[dst + i] = f2bf(__fadd_rn(bf2f(x[dst + i]), bf2f(f[src + i])));
}

// One block per token row of [T, W]: heads [0, heads) of width D from the row's start are
// rotated in place (half-split form) at position row % L.
extern "C" __global__ void rope_heads(unsigned short* qkv, const float* cosv, const float* sinv,
                                      int W, int L, int heads, int D) {
    int half = D >> 1;
    size_t row = blockIdx.x;
    unsigned short* p = qkv + row * W;
    const float* c = cosv + (size_t)(row % L) * half;
    const float* s = sinv + (size_t)(row % L) * half;
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
        int h = j / half, i = j - h * half;
        unsigned short* head = p + h * D;
        float lo = bf2f(head[i]), hi = bf2f(head[i + half]);
        head[i] = f2bf(__fsub_rn(__fmul_rn(lo, c[i]), __fmul_rn(hi, s[i])));
        head[i + half] = f2bf(__fadd_rn(__fmul_rn(hi, c[i]), __fmul_rn(lo, s[i])));
    }
}

// The same three with four elements per thread (8-byte loads: a warp moves 256 bytes, where
// 2-byte loads move 64), for rows whose widths are multiples of 4 (every model's).
__device__ __forceinline__ void unpack4(uint2 r, float* f) {
    f[0] = __uint_as_float(r.x << 16); f[1] = __uint_as_float(r.x & 0xffff0000u);
    f[2] = __uint_as_float(r.y << 16); f[3] = __uint_as_float(r.y & 0xffff0000u);
}
__device__ __forceinline__ uint2 pack4(const float* f) {
    return make_uint2((unsigned)f2bf(f[0]) | ((unsigned)f2bf(f[1]) << 16),
                      (unsigned)f2bf(f[2]) | ((unsigned)f2bf(f[3]) << 16));
}

extern "C" __global__ void add_rmsnorm4(unsigned short* x, const unsigned short* y, int has_y,
                                        const unsigned short* w, unsigned short* out, int H, float eps) {
    size_t base = (size_t)blockIdx.x * H;
    uint2* xr = (uint2*)(x + base);
    const uint2* yr = (const uint2*)(y + base);
    const int n4 = H >> 2;
    float ss = 0.0f, v[4], u[4];
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        unpack4(xr[i], v);
        if (has_y) {
            unpack4(yr[i], u);
            for (int k = 0; k < 4; ++k) v[k] = bf2f(f2bf(__fadd_rn(v[k], u[k])));
            xr[i] = pack4(v);
        }
        for (int k = 0; k < 4; ++k) ss = __fmaf_rn(v[k], v[k], ss);
    }
    float inv = 1.0f / sqrtf(__fadd_rn(block_sum(ss) / (float)H, eps));
    const uint2* w4 = (const uint2*)w;
    uint2* o4 = (uint2*)(out + base);
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        unpack4(xr[i], v);
        float gw[4];
        unpack4(w4[i], gw);
        for (int k = 0; k < 4; ++k) v[k] = __fmul_rn(__fmul_rn(v[k], inv), gw[k]);
        o4[i] = pack4(v);
    }
}

extern "C" __global__ void add_rows4(unsigned short* x, const long long* rows, const unsigned short* f, int H) {
    uint2* dst = (uint2*)(x + (size_t)rows[blockIdx.x] * H);
    const uint2* src = (const uint2*)(f + (size_t)blockIdx.x * H);
    float a[4], b[4];
    for (int i = threadIdx.x; i < (H >> 2); i += blockDim.x) {
        unpack4(dst[i], a); unpack4(src[i], b);
        for (int k = 0; k < 4; ++k) a[k] = __fadd_rn(a[k], b[k]);
        dst[i] = pack4(a);
    }
}

extern "C" __global__ void rope_heads4(unsigned short* qkv, const float* cosv, const float* sinv,
                                       int W, int L, int heads, int D) {
    const int half = D >> 1, q4 = half >> 2;
    size_t row = blockIdx.x;
    unsigned short* p = qkv + row * W;
    const float4* c = (const float4*)(cosv + (size_t)(row % L) * half);
    const float4* s = (const float4*)(sinv + (size_t)(row % L) * half);
    float lo[4], hi[4], a[4], b[4];
    for (int j = threadIdx.x; j < heads * q4; j += blockDim.x) {
        const int h = j / q4, i = j - h * q4;
        uint2* lp = (uint2*)(p + h * D) + i;
        uint2* hp = (uint2*)(p + h * D + half) + i;
        unpack4(*lp, lo); unpack4(*hp, hi);
        const float4 cc = c[i], sc = s[i];
        const float cv[4] = {cc.x, cc.y, cc.z, cc.w}, sv[4] = {sc.x, sc.y, sc.z, sc.w};
        for (int k = 0; k < 4; ++k) {
            a[k] = __fsub_rn(__fmul_rn(lo[k], cv[k]), __fmul_rn(hi[k], sv[k]));
            b[k] = __fadd_rn(__fmul_rn(hi[k], cv[k]), __fmul_rn(lo[k], sv[k]));
        }
        *lp = pack4(a); *hp = pack4(b);
    }
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    return cp.RawModule(code=_SOURCE, options=("--std=c++14",)).get_function(name)


def _aligned(*pairs) -> bool:
    """Whether each (array, bytes) starts on a multiple of bytes (the vector kernels' loads)."""
    return all(a.data.ptr % n == 0 for a, n in pairs)


def _threads(work: int) -> int:
    return max(32, min(1024, 32 * ((work + 31) // 32)))


def add_rmsnorm(x, y, weight, eps: float):
    """x: [..., H] bf16 (contiguous); y: like x or None; weight: [H] -> rmsnorm(x (+ y)) bf16.
    With y, x is updated in place to the rounded sum (the residual stream)."""
    H = x.shape[-1]
    rows = x.size // H
    if y is None:
        x = cp.ascontiguousarray(x)
    elif not x.flags.c_contiguous:                # the residual stream is updated in place
        raise ValueError("add_rmsnorm: x must be contiguous when y is added to it")
    out = cp.empty_like(x)
    # read as bf16 in the kernel: weights on the GPU are bf16 (Backend.weight_dtype), so this is
    # no copy there, where an fp32 copy per call cost a kernel per norm of every decode step
    w = cp.ascontiguousarray(weight.astype(BF16, copy=False)).view(cp.uint16)
    y16 = x.view(cp.uint16) if y is None else cp.ascontiguousarray(y).view(cp.uint16)
    if rows and H % 4 == 0 and _aligned((x, 8), (y16, 8), (out, 8), (w, 8)):
        _kernel("add_rmsnorm4")((rows,), (_threads(min(H // 4, 1024)),),
                                (x.view(cp.uint16), y16, cp.int32(y is not None), w, out.view(cp.uint16),
                                 cp.int32(H), cp.float32(eps)))
    elif rows:
        _kernel("add_rmsnorm")((rows,), (_threads(min(H, 1024) // 4),),
                               (x.view(cp.uint16), y16, cp.int32(y is not None), w, out.view(cp.uint16),
                                cp.int32(H), cp.float32(eps)))
    return out


def add_rows(x, rows, f) -> None:
    """x: [N, H] bf16 contiguous, rows: [n] ints, f: [n, H] bf16: x[rows] += f in one pass."""
    n, H = f.shape
    if not x.flags.c_contiguous or x.dtype != f.dtype:
        raise ValueError("add_rows: x must be contiguous and of f's dtype (bf16)")
    f = cp.ascontiguousarray(f)
    if n and H % 4 == 0 and _aligned((x, 8), (f, 8)):
        _kernel("add_rows4")((n,), (_threads(min(H // 4, 1024)),),
                             (x.view(cp.uint16), cp.ascontiguousarray(rows, dtype=cp.int64),
                              f.view(cp.uint16), cp.int32(H)))
    elif n:
        _kernel("add_rows")((n,), (_threads(min(H, 1024) // 4),),
                            (x.view(cp.uint16), cp.ascontiguousarray(rows, dtype=cp.int64),
                             f.view(cp.uint16), cp.int32(H)))


def rope_heads(qkv, cos, sin, heads: int, head_dim: int) -> None:
    """qkv: [S, L, W] bf16, contiguous; rotate the first ``heads`` heads of every row in place.
    cos, sin: [L, head_dim/2] fp32."""
    S, L, W = qkv.shape
    if not qkv.flags.c_contiguous:
        raise ValueError("rope_heads: qkv must be contiguous")
    cos, sin = (cp.ascontiguousarray(t.astype(cp.float32, copy=False)) for t in (cos, sin))
    if S * L and head_dim % 8 == 0 and W % 4 == 0 and _aligned((qkv, 8), (cos, 16), (sin, 16)):
        _kernel("rope_heads4")((S * L,), (_threads(min(heads * head_dim // 8, 1024)),),
                               (qkv.view(cp.uint16), cos, sin,
                                cp.int32(W), cp.int32(L), cp.int32(heads), cp.int32(head_dim)))
    elif S * L:
        _kernel("rope_heads")((S * L,), (_threads(min(heads * head_dim // 2, 1024) // 2),),
                              (qkv.view(cp.uint16), cos, sin,
                               cp.int32(W), cp.int32(L), cp.int32(heads), cp.int32(head_dim)))


__all__ = ["add_rmsnorm", "add_rows", "rope_heads"]
