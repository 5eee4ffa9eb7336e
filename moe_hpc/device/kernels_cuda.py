"""CUDA versions of ``kernels``: bf16 handled as raw 16-bit words so no kernel depends on a
compiler's bf16 support; conversions round to nearest even, like ml_dtypes.

Imported only when a CuPy array reaches ``kernels``.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import cupy as cp
import numpy as np

from ..config.run_config import split_kind
from .dtypes import BF16
from .expert_batches import batched_rows, tail_windows

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
    "identity": "v",            # a bias alone (add_bias)
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
extern "C" __global__ void moe_copy_rows(const uint4* src, const long long* src_rows, long long src_stride,
                                         uint4* dst, const long long* dst_rows, long long dst_stride,
                                         int row_vecs) {
    // one block per row; 16-byte vectors; strides in vectors; a null index means "row i itself"
    long long i = blockIdx.x;
    long long s = src_rows ? src_rows[i] : i, d = dst_rows ? dst_rows[i] : i;
    const uint4* from = src + s * src_stride;
    uint4* to = dst + d * dst_stride;
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


def _vector_rows(a) -> bool:
    """Whether a 2-D array's rows can be read as 16-byte vectors: each row contiguous, its bytes
    and its row stride multiples of 16, the start 16-byte aligned (views of wider rows too, such
    as the keys' columns of a fused QKV projection)."""
    if a.ndim != 2:
        return False
    row = a.shape[1] * a.itemsize
    return ((a.strides[1] == a.itemsize or a.shape[1] == 1) and row % 16 == 0
            and a.strides[0] % 16 == 0 and a.data.ptr % 16 == 0)


def move_rows(src, dst, src_rows=None, dst_rows=None) -> None:
    """Row copy for any 2-D array: the vector kernel where rows are 16-byte vectors (strided
    views included, read in place), else a 16-bit word copy."""
    if _vector_rows(src) and _vector_rows(dst) and src.shape[1] * src.itemsize == dst.shape[1] * dst.itemsize:
        return copy_rows(src, dst, src_rows, dst_rows,
                         count=None if src_rows is not None or dst_rows is not None else src.shape[0])
    words = lambda a: a.view(cp.uint16)
    picked = words(src) if src_rows is None else words(src)[src_rows]
    if dst_rows is None:
        words(dst)[...] = picked
    else:
        words(dst)[dst_rows] = picked


def copy_rows(src, dst, src_rows=None, dst_rows=None, count=None) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] for whole rows (16-bit elements, row bytes and row
    strides multiples of 16); a missing index means the identity. 16-byte vectors."""
    n = int(count if count is not None else (src_rows if src_rows is not None else dst_rows).size)
    if n == 0:
        return
    width = src.shape[1] * src.dtype.itemsize
    idx = lambda r: np.uint64(0) if r is None else cp.ascontiguousarray(r, dtype=cp.int64)
    stride = lambda a: np.int64(a.strides[0] // 16 if a.shape[0] > 1 else width // 16)
    _COPY_ROWS((n,), (128,), (np.uint64(src.data.ptr), idx(src_rows), stride(src), np.uint64(dst.data.ptr),
                              idx(dst_rows), stride(dst), np.int32(width // 16)))


# ---------------------------------------------------------------- dispatch plan: a stable counting sort
# Keys are (micro-batch, destination rank, slot there): few distinct values, so a counting sort
# in three launches replaces a radix sort plus a dozen elementwise kernels. TILE entries per
# block; ranks inside a tile come from comparing keys in shared memory (stable, no atomics on
# positions), so the order is the same on every run.
_PLAN_TILE = 512

_PLAN_MODULE = cp.RawModule(code=r"""
extern "C" __global__ void moe_plan_keys(const long long* experts, const long long* token_ids,
        const long long* replica, const long long* holders, const long long* replicas,
        const long long* slot, int R, long long N, int K, long long mbt, int P, int S, int NK,
        int* keys, int* block_hist) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    long long t = i / K, f = experts[i];
    long long r = replica ? replica[i] : token_ids[t] % replicas[f];
    int key = (int)(((t / mbt) * P + holders[f * R + r]) * S + slot[f * R + r]);
    keys[i] = key;
    atomicAdd(&block_hist[(long long)blockIdx.x * NK + key], 1);
}

extern "C" __global__ void moe_plan_scan(int* block_hist, int B, int NK, long long* key_start,
                                         long long* counts) {
    // one block: per key, blocks' offsets within the key; then keys' starts (exclusive scan)
    __shared__ long long carry;
    __shared__ long long part[1024];
    for (int key = threadIdx.x; key < NK; key += blockDim.x) {
        int run = 0;
        for (long long b = 0; b < B; ++b) { int v = block_hist[b * NK + key]; block_hist[b * NK + key] = run; run += v; }
        counts[key] = run;
    }
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (int base = 0; base < NK; base += blockDim.x) {
        int key = base + threadIdx.x;
        long long v = key < NK ? counts[key] : 0;
        part[threadIdx.x] = v;
        __syncthreads();
        for (int d = 1; d < blockDim.x; d <<= 1) {           // inclusive Hillis-Steele scan
            long long add = threadIdx.x >= d ? part[threadIdx.x - d] : 0;
            __syncthreads();
            part[threadIdx.x] += add;
            __syncthreads();
        }
        if (key < NK) key_start[key] = carry + part[threadIdx.x] - v;
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) carry += part[threadIdx.x];
        __syncthreads();
    }
    for (int key = threadIdx.x; key < NK; key += blockDim.x) {
        long long s = key_start[key];
        for (long long b = 0; b < B; ++b) block_hist[b * NK + key] += (int)s;
    }
}

extern "C" __global__ void moe_plan_scatter(const int* keys, const int* block_hist,
        const long long* key_start, long long N, int NK, int PS, long long* order,
        long long* positions) {
    __shared__ int tile[512];
    long long lo = (long long)blockIdx.x * blockDim.x, i = lo + threadIdx.x;
    int key = i < N ? keys[i] : -1;
    tile[threadIdx.x] = key;
    __syncthreads();
    if (i >= N) return;
    int rank = 0;
    for (int j = 0; j < threadIdx.x; ++j) rank += tile[j] == key;
    long long pos = block_hist[(long long)blockIdx.x * NK + key] + rank;
    order[pos] = i;
    positions[i] = pos - key_start[(key / PS) * PS];       // within its micro-batch
}
""")


_PLAN_MAX_HIST = 1 << 22      # (tiles x keys) counters; past it (huge steps, many slots) a radix sort


def counting_sort_fits(pairs: int, keys: int) -> bool:
    """Whether the counting-sort plan's per-tile histograms stay small (and its indices in range);
    ``kernels.dispatch_plan`` takes a radix sort otherwise."""
    return max(1, -(-pairs // _PLAN_TILE)) * keys <= _PLAN_MAX_HIST and pairs < 2 ** 31


@functools.lru_cache(maxsize=None)
def _plan_kernel(name: str):
    return _PLAN_MODULE.get_function(name)


def dispatch_plan(experts, token_ids, holders, replicas, slot, micro_batch_tokens: int,
                  micro_batches: int, world_size: int, num_slots: int, replica=None):
    """See ``kernels.dispatch_plan``; all inputs on the device, the step small enough for
    ``counting_sort_fits``."""
    N, K = experts.shape[0] * experts.shape[1], experts.shape[1]
    P, S = world_size, num_slots
    NK = micro_batches * P * S
    B = max(1, -(-N // _PLAN_TILE))
    keys = cp.empty(max(N, 1), cp.int32)
    hist = cp.zeros(B * NK, cp.int32)
    order, positions = cp.empty(N, cp.int64), cp.empty(N, cp.int64)
    key_start, counts = cp.empty(NK, cp.int64), cp.empty(NK, cp.int64)
    i64 = lambda a: cp.ascontiguousarray(a, dtype=cp.int64)
    if N:
        _plan_kernel("moe_plan_keys")(
            (B,), (_PLAN_TILE,), (i64(experts), i64(token_ids), np.uint64(0) if replica is None else i64(replica),
                                  i64(holders), i64(replicas), i64(slot), np.int32(holders.shape[1]), np.int64(N),
                                  np.int32(K), np.int64(micro_batch_tokens), np.int32(P), np.int32(S), np.int32(NK),
                                  keys, hist))
    _plan_kernel("moe_plan_scan")((1,), (1024,), (hist, np.int32(B), np.int32(NK), key_start, counts))
    if N:
        _plan_kernel("moe_plan_scatter")(
            (B,), (_PLAN_TILE,), (keys, hist, key_start, np.int64(N), np.int32(NK), np.int32(P * S), order, positions))
    return order, positions.reshape(experts.shape), counts


# ---------------------------------------------------------------- block permutes for the exchange
_PERMUTE_SOURCE = r"""
extern "C" __global__ void moe_permute_blocks(const T* __restrict__ src, T* __restrict__ dst,
                                              const long long* table, int blocks, int row_vecs) {
    // table: [3, blocks] = source row offset, destination row offset, rows of each block. A
    // block's rows are contiguous at both ends, so it is one flat copy: grid.x walks the blocks,
    // grid.y and the threads stride over its vectors, four loads in flight before the stores.
    const long long stride = (long long)gridDim.y * blockDim.x;
    for (int b = blockIdx.x; b < blocks; b += gridDim.x) {
        const long long total = table[2 * blocks + b] * row_vecs;
        const T* from = src + table[b] * row_vecs;
        T* to = dst + table[blocks + b] * row_vecs;
        for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < total; i += 4 * stride) {
            T v[4];
            #pragma unroll
            for (int k = 0; k < 4; ++k) if (i + k * stride < total) v[k] = from[i + k * stride];
            #pragma unroll
            for (int k = 0; k < 4; ++k) if (i + k * stride < total) to[i + k * stride] = v[k];
        }
    }
}
"""
# rows of a multiple of 16 bytes move as 16-byte vectors; others (H not a multiple of 8) word by word
_PERMUTE_BLOCKS = {16: cp.RawKernel("typedef uint4 T;" + _PERMUTE_SOURCE, "moe_permute_blocks"),
                   2: cp.RawKernel("typedef unsigned short T;" + _PERMUTE_SOURCE, "moe_permute_blocks")}


def permute_blocks(src, dst, table, blocks: int) -> None:
    """Copy contiguous row blocks: for each b < blocks, rows [s_b, s_b + n_b) of ``src`` to rows
    [d_b, d_b + n_b) of ``dst``; ``table`` is [3, blocks] int64 on the device (s, d, n).
    16-byte vectors where a row is a multiple of 16 bytes, 2-byte words otherwise."""
    if blocks == 0:
        return
    width = src.shape[1] * src.dtype.itemsize
    unit = 16 if width % 16 == 0 else 2
    gx = min(blocks, 1024)
    gy = max(1, min(1024, -(-8 * _sm_count(cp.cuda.Device().id) // gx)))     # ~8 blocks of 256 per SM
    _PERMUTE_BLOCKS[unit]((gx, gy), (256,), (src, dst, table, np.int32(blocks), np.int32(width // unit)))


_GATE_TOPK = cp.RawKernel(r"""
#define MAXK 8
__device__ __forceinline__ void better(float& v, int& e, float v2, int e2) {
    // the larger value wins; a tie keeps the lower index (SPEC's order); e < 0: nothing yet
    if (e2 >= 0 && (e < 0 || v2 > v || (v2 == v && e2 < e))) { v = v2; e = e2; }
}
extern "C" __global__ void moe_gate_topk(const float* logits, const float* bias, int T, int E, int K,
                                         int normalize, int* experts, float* weights) {
    // one warp per token (a decode step's few tokens are 64 warps, not one thread each): softmax
    // in fp32, choice by p + bias, weights from p (SPEC); K rounds of a warp-wide argmax
    int t = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (t >= T) return;
    const float* l = logits + (long long)t * E;
    float mx = __int_as_float(0xff800000);      // -inf (NVRTC has no INFINITY)
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, l[e]);
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float z = 0.0f;
    for (int e = lane; e < E; e += 32) z += expf(l[e] - mx);
    for (int o = 16; o; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    int best[MAXK];
    float sum = 0.0f, p[MAXK];
    for (int j = 0; j < K; ++j) {
        float v = 0.0f; int e = -1;
        for (int c = lane; c < E; c += 32) {
            bool taken = false;
            for (int i = 0; i < j; ++i) taken |= best[i] == c;
            if (!taken) better(v, e, expf(l[c] - mx) / z + (bias ? bias[c] : 0.0f), c);
        }
        for (int o = 16; o; o >>= 1) better(v, e, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, e, o));
        best[j] = e;
        p[j] = expf(l[e] - mx) / z;
        sum += p[j];
    }
    if (lane < K) {
        float pj = 0.0f; int ej = 0;
        for (int j = 0; j < K; ++j) if (j == lane) { pj = p[j]; ej = best[j]; }
        experts[(long long)t * K + lane] = ej;
        weights[(long long)t * K + lane] = normalize ? pj / sum : pj;
    }
}
""", "moe_gate_topk")


def gate_topk(logits, bias, k: int, normalize: bool):
    """See ``kernels.gate_topk``: one launch instead of a softmax's five plus the top-k, a warp
    per token (four per block)."""
    if k > 8:
        raise ValueError("the GPU top-k kernel handles top_k <= 8")
    if k > logits.shape[-1]:
        raise ValueError(f"top_k = {k} exceeds the {logits.shape[-1]} experts")
    T, E = logits.shape
    experts = cp.empty((T, k), dtype=cp.int32)
    weights = cp.empty((T, k), dtype=cp.float32)
    if T:
        _GATE_TOPK(((T + 3) // 4,), (128,), (cp.ascontiguousarray(logits, dtype=cp.float32),
                   np.uint64(0) if bias is None else cp.ascontiguousarray(bias, dtype=cp.float32), np.int32(T),
                   np.int32(E), np.int32(k), np.int32(normalize), experts, weights))
    return experts, weights


_COUNT = cp.RawKernel(r"""
extern "C" __global__ void moe_count(const int* ids, long long n, unsigned long long* counts) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(&counts[ids[i]], 1ULL);
}
""", "moe_count")


def count_into(counts, ids) -> None:
    """counts[ids[i]] += 1 for every i, on the device, without reading anything back (CuPy's
    bincount sizes its output from ids.max(), a device-to-host round trip)."""
    ids = cp.ascontiguousarray(ids.reshape(-1), dtype=cp.int32)
    if ids.size:
        _COUNT(((ids.size + 255) // 256,), (256,), (ids, np.int64(ids.size), counts.view(cp.uint64)))


class _Cublas:
    """The few cuBLAS entry points the kernels call, through ctypes on the libcublas CuPy
    loaded, with a handle of their own (``_cublas_handle``). Not CuPy's wrappers: CuPy refuses every cuBLAS call while a
    stream captures a CUDA graph ("calling cuBLAS API during stream capture is currently
    unsupported"), and cuBLAS itself captures its GEMMs, so a decode step's graph
    (runtime/decode_graph.py) needs a way past the refusal. Same arguments as CuPy's."""
    CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT, CUBLAS_POINTER_MODE_HOST = 68, -1, 0

    def __init__(self):
        import ctypes as c
        cp.cuda.device.get_cublas_handle()              # loads libcublas if nothing has yet
        lib = _cublas_library()
        P, I, L = c.c_void_p, c.c_int, c.c_longlong
        self._set_stream, self._set_mode = (self._fn(lib, "cublasSetStream_v2", [P, P]),
                                            self._fn(lib, "cublasSetPointerMode_v2", [P, I]))
        self._set_workspace = self._fn(lib, "cublasSetWorkspace_v2", [P, P, c.c_size_t])
        self._create = self._fn(lib, "cublasCreate_v2", [c.POINTER(P)])
        self._gemm = self._fn(lib, "cublasGemmEx", [P, I, I, I, I, I, P, P, I, I, P, I, I, P, P, I, I, I, I])
        self._batched = self._fn(lib, "cublasGemmStridedBatchedEx",
                                 [P, I, I, I, I, I, P, P, I, I, L, P, I, I, L, P, P, I, I, L, I, I, I])
        self._pointers = self._fn(lib, "cublasGemmBatchedEx",
                                  [P, I, I, I, I, I, P, P, I, I, P, I, I, P, P, I, I, I, I, I])
        self._c = c

    @staticmethod
    def _fn(lib, name: str, argtypes):
        import ctypes
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int          # cublasStatus_t
        return fn

    @staticmethod
    def _check(status: int, name: str) -> None:
        if status:
            raise RuntimeError(f"{name} failed with cuBLAS status {status}")

    def setStream(self, handle, stream) -> None:
        """The handle on ``stream`` with the device's workspace: cuBLAS resets a handle's
        workspace to its small default pool at every stream change, which rules out some of
        Hopper's GEMM kernels and allocates inside a graph capture."""
        self._check(self._set_stream(handle, stream), "cublasSetStream")
        space = _cublas_workspace(cp.cuda.Device().id)
        self._check(self._set_workspace(handle, space.data.ptr, space.nbytes), "cublasSetWorkspace")

    def create(self) -> int:
        """A new handle on the current device."""
        handle = self._c.c_void_p()
        self._check(self._create(self._c.byref(handle)), "cublasCreate")
        return handle.value

    def setPointerMode(self, handle, mode: int) -> None:
        self._check(self._set_mode(handle, mode), "cublasSetPointerMode")

    def gemmEx(self, *args) -> None:
        self._check(self._gemm(*args), "cublasGemmEx")

    def gemmStridedBatchedEx(self, *args) -> None:
        self._check(self._batched(*args), "cublasGemmStridedBatchedEx")

    def gemmBatchedEx(self, *args) -> None:
        self._check(self._pointers(*args), "cublasGemmBatchedEx")


@functools.lru_cache(maxsize=None)
def _cublas_api() -> _Cublas:
    return _Cublas()


CUBLAS_WORKSPACE_BYTES = 64 << 20      # cuBLAS asks for 32 MiB on Hopper; twice that leaves room


@functools.lru_cache(maxsize=None)
def _cublas_workspace(device: int):
    return cp.empty(CUBLAS_WORKSPACE_BYTES, cp.uint8)


@functools.lru_cache(maxsize=None)
def _cublas_handle(device: int) -> int:
    """The kernels' own cuBLAS handle of ``device`` (made once, scalars read from host memory),
    not CuPy's: CuPy sets its handle's stream before each of its calls, and every stream change
    resets a handle's workspace, after which cuBLAS chooses its kernels again. Measured on the
    H200 (host time per strided-batched GEMM): 34 us for a shape seen before on a handle left
    alone, 55 us with the stream and workspace set again, and 0.7 ms against 2.6 ms for a new
    shape."""
    cublas = _cublas_api()
    handle = cublas.create()
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    return handle


_HANDLE_STREAM: dict = {}          # device -> the stream its handle was last set to
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)       # alpha, beta (host memory)


@contextlib.contextmanager
def _cublas_on_current_stream():
    """(cublas entry points, handle, alpha = 1, beta = 0): the kernels' handle on the current
    stream, set (with the workspace) only when the stream changed since the last call."""
    device = cp.cuda.Device().id
    cublas, handle, stream = _cublas_api(), _cublas_handle(device), cp.cuda.get_current_stream().ptr
    if _HANDLE_STREAM.get(device) != stream:
        cublas.setStream(handle, stream)
        _HANDLE_STREAM[device] = stream
    yield cublas, handle, _ONE.ctypes.data, _ZERO.ctypes.data


def gemm(a, b, out=None, dtype=BF16):
    """a [M, K] @ b [K, N] with bf16 operands and fp32 accumulation -> [M, N] of ``dtype`` (bf16
    or fp32), into ``out`` when given. Either operand (and ``out``) may be a view whose rows are
    strided (a column block of a fused weight, a slice of a wider buffer): cuBLAS reads it
    through its leading dimension, never a copy. Row-major: C^T = B^T A^T."""
    a, b = (x if x.strides[1] == x.itemsize else cp.ascontiguousarray(x) for x in (a, b))
    if a.flags.c_contiguous and b.flags.c_contiguous and (out is None or out.flags.c_contiguous) \
            and dtype == BF16 and (out is None or out.dtype == BF16) and not cp.cuda.get_current_stream().is_capturing():
        # packed operands outside a capture: CuPy's matmul, measurably faster on the dense MLP's
        # shapes (benchmarks/gemm_ab.py: 747-768 against 685 TFLOP/s; the same on the others)
        return cp.matmul(a, b, out=out)
    m, kdim = a.shape
    n = b.shape[1]
    if out is None:
        out = cp.empty((m, n), dtype=dtype)
    assert out.strides[1] == out.itemsize, "rows of the output must be contiguous"
    if m == 0 or n == 0:
        return out
    assert all(x.strides[0] > 0 for x in (a, b, out) if x.shape[0] > 1), "rows must ascend in memory"
    ld = lambda x: max(x.strides[0] // x.itemsize, x.shape[1]) if x.shape[0] > 1 else x.shape[1]
    ctype = 0 if out.dtype == cp.float32 else 14                     # CUDA_R_32F or CUDA_R_16BF
    with _cublas_on_current_stream() as (cublas, handle, one, zero):
        cublas.gemmEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, n, m, kdim,
                      one, b.data.ptr, 14, ld(b), a.data.ptr, 14, ld(a),   # 14: CUDA_R_16BF
                      zero, out.data.ptr, ctype, ld(out),
                      cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
    return out


def matmul_f32out(a, b):
    """bf16 x bf16 -> fp32 (``gemm``)."""
    return gemm(a, b, dtype=cp.float32)


# ---------------------------------------------------------------- decode attention
# One new query per sequence over its bf16 KV cache, read once by cuBLAS (bf16 operands, fp32
# accumulation): no fp32 copy of the cache is made. Row-major arrays are column-major arrays
# transposed, so each product below is written as cuBLAS sees it (the transposed product).
#
# scores[s, h] (g x Lk) = scale * Q[s, h] (g x D) @ K[s, :, h, :]^T (D x Lk). Column-major:
#   scores^T (Lk x g, ldc = Lk) = op(A) B with
#   A = K[s, :, h, :]: row-major Lk x D with row stride ldk = k.strides[1] is column-major
#       D x Lk (lda = ldk), so op(A) = A^T = K (Lk x D): transa = T;
#   B = Q[s, h]: row-major g x D (row stride D) is column-major D x g = Q^T (ldb = D): transb = N;
#   m = Lk, n = g, k = D, alpha = scale (fp32, applied to the fp32 accumulator).
# out[s, h] (g x Dv) = P[s, h] (g x Lk) @ V[s, :, h, :] (Lk x Dv). Column-major:
#   out^T (Dv x g, ldc = Dv) = A B with
#   A = V[s, :, h, :]: row-major Lk x Dv (row stride ldv) is column-major Dv x Lk = V^T
#       (lda = ldv): transa = N;
#   B = P[s, h]: row-major g x Lk (row stride Lk) is column-major Lk x g = P^T (ldb = Lk):
#   transb = N; m = Dv, n = g, k = Lk.
# (s, h) cannot be one strided batch (the cache's sequence stride is not kv times its head
# stride), so one index is a loop and the other the batch: the loop runs over the smaller.


def _head_gemms(trans_a: bool, m: int, n: int, k: int, alpha: float, a, lda: int, a_strides, b, ldb: int,
                b_strides, c, ldc: int, c_strides, S: int, kv: int) -> None:
    """For every (s, h) < (S, kv): c(s, h) = alpha op(a(s, h)) b(s, h), column-major, where
    x(s, h) starts ``s * x_strides[0] + h * x_strides[1]`` elements into x; a and b bf16, c fp32."""
    loop_s = S <= kv
    loops, batch = (S, kv) if loop_s else (kv, S)
    pick = 0 if loop_s else 1                   # which stride steps the loop; the other the batch
    scale = np.full(1, alpha, np.float32)
    with _cublas_on_current_stream() as (cublas, handle, _, zero):
        op_a = cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N
        for i in range(loops):
            cublas.gemmStridedBatchedEx(
                handle, op_a, cublas.CUBLAS_OP_N, m, n, k, scale.ctypes.data,
                a.data.ptr + i * a_strides[pick] * a.itemsize, 14, lda, a_strides[1 - pick],   # 14: CUDA_R_16BF
                b.data.ptr + i * b_strides[pick] * b.itemsize, 14, ldb, b_strides[1 - pick],
                zero, c.data.ptr + i * c_strides[pick] * c.itemsize, 0, ldc, c_strides[1 - pick],  # 0: CUDA_R_32F
                batch, cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)


def _rows_of_heads(x):
    """A cache view [S, Lk, kv, D] with each head's D elements contiguous (copied if not) and its
    strides in elements: (the view, sequence stride, position stride, head stride)."""
    if x.strides[3] != x.itemsize or any(st % x.itemsize for st in x.strides):
        x = cp.ascontiguousarray(x)
    s_stride, ld, h_stride = (st // x.itemsize for st in x.strides[:3])
    return x, s_stride, max(ld, x.shape[3]), h_stride     # one position: any ld >= D will do


def decode_attention_bf16(q, k, v, last, scale: float):
    """``model.attention.decode_attention`` on the GPU. q: [S, 1, nh, D], k: [S, Lk, kv, D],
    v: [S, Lk, kv, Dv] bf16 (views of the cache: any sequence and position strides); last: [S]
    ints -> [S, 1, nh Dv] bf16. Scores, softmax and the output accumulate in fp32; the
    probabilities enter the P @ V GEMM rounded to bf16 (cuBLAS wants both operands of one type;
    flash attention rounds them too) and the output is divided by their fp32 sum afterwards."""
    S, _, nh, D = q.shape
    Lk, kv, Dv = k.shape[1], k.shape[2], v.shape[3]
    g = nh // kv
    assert q.dtype == k.dtype == v.dtype == BF16, "cuBLAS reads the operands as bf16"
    q = cp.ascontiguousarray(q).reshape(S, kv, g, D)
    k, k_s, ldk, k_h = _rows_of_heads(k)
    v, v_s, ldv, v_h = _rows_of_heads(v)
    scores = cp.empty((S, kv, g, Lk), cp.float32)
    _head_gemms(True, Lk, g, D, scale, k, ldk, (k_s, k_h), q, D, (kv * g * D, g * D),
                scores, Lk, (kv * g * Lk, g * Lk), S, kv)
    seen = (cp.arange(Lk)[None, :] <= cp.asarray(last)[:, None])[:, None, None, :]
    scores = cp.where(seen, scores, cp.float32(-np.inf))
    p = cp.exp(scores - scores.max(axis=-1, keepdims=True))
    total = p.sum(axis=-1, keepdims=True)
    p16 = cp.ascontiguousarray(p.astype(BF16))
    out = cp.empty((S, kv, g, Dv), cp.float32)
    _head_gemms(False, Dv, g, Lk, 1.0, v, ldv, (v_s, v_h), p16, Lk, (kv * g * Lk, g * Lk),
                out, Dv, (kv * g * Dv, g * Dv), S, kv)
    return (out / total).astype(BF16).reshape(S, 1, nh * Dv)


# ---------------------------------------------------------------- fused decode attention
# One kernel reads each sequence's cache once (flash decoding): a block per (sequence, kv head,
# split of the positions) holds the kv head's G query heads in registers; each group of D/8
# lanes takes one position at a time (a 16-byte load of its k row and of its v row), so the
# block streams the cache with no score ever written to memory. Scores are kept in the log2
# domain (scale * log2 e folded into q) with an fp32 online softmax per group, merged across the
# block's groups in shared memory and, where the positions are split over blocks (few sequences
# and heads, long caches), across the splits by a second small kernel.
_DECODE_THREADS = 128
_DECODE_SRC = r"""
#define G {G}
#define D {D}
#define LANES (D / 8)
#define NEG_INF __int_as_float(0xff800000)
#define GROUPS ({threads} / LANES)
__device__ __forceinline__ void unpack8(uint4 r, float* f) {{
    const unsigned int w[4] = {{r.x, r.y, r.z, r.w}};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {{ f[2 * i] = __uint_as_float(w[i] << 16); f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }}
}}
extern "C" __global__ void __launch_bounds__({threads})
moe_decode_attention(const unsigned short* __restrict__ q, long long qs,
                     const unsigned short* __restrict__ k, long long ks, long long kp, long long kh,
                     const unsigned short* __restrict__ v, long long vs, long long vp, long long vh,
                     const long long* __restrict__ seq_rows, const long long* __restrict__ last,
                     int kv, int splits, long long chunk, float scale_log2,
                     unsigned short* __restrict__ out, float* __restrict__ part) {{
    __shared__ float sm_m[GROUPS][G], sm_l[GROUPS][G], sm_acc[GROUPS * G * D];
    const int split = blockIdx.x % splits, h = (blockIdx.x / splits) % kv;
    const long long b = blockIdx.x / splits / kv;               // the batch entry
    const long long s = seq_rows ? seq_rows[b] : b;             // its cache row
    const int grp = threadIdx.x / LANES, lane = threadIdx.x % LANES;
    const long long n = last[b] + 1, p0 = split * chunk, p1 = min(n, p0 + chunk);
    float qf[G][8], m[G], l[G], acc[G][8];
    #pragma unroll
    for (int g = 0; g < G; ++g) {{
        unpack8(*(const uint4*)(q + b * qs + (h * G + g) * D + lane * 8), qf[g]);
        #pragma unroll
        for (int i = 0; i < 8; ++i) {{ qf[g][i] *= scale_log2; acc[g][i] = 0.0f; }}
        m[g] = NEG_INF; l[g] = 0.0f;
    }}
    const unsigned short* kb = k + s * ks + h * kh + lane * 8;
    const unsigned short* vb = v + s * vs + h * vh + lane * 8;
    // every lane of a warp runs the same trips (the shuffles need them all); a group past the
    // end computes on nothing and keeps its state
    for (long long base = p0; base < p1; base += 2 * GROUPS) {{
        const long long pa = base + grp, pb = pa + GROUPS;
        const bool va = pa < p1, vb_ = pb < p1;
        uint4 ka = make_uint4(0, 0, 0, 0), kb2 = ka, xa = ka, xb = ka;
        if (va) {{ ka = *(const uint4*)(kb + pa * kp); xa = *(const uint4*)(vb + pa * vp); }}
        if (vb_) {{ kb2 = *(const uint4*)(kb + pb * kp); xb = *(const uint4*)(vb + pb * vp); }}
        float kfa[8], kfb[8], vfa[8], vfb[8];
        unpack8(ka, kfa); unpack8(kb2, kfb); unpack8(xa, vfa); unpack8(xb, vfb);
        #pragma unroll
        for (int g = 0; g < G; ++g) {{
            float sa = 0.0f, sb = 0.0f;
            #pragma unroll
            for (int i = 0; i < 8; ++i) {{ sa += qf[g][i] * kfa[i]; sb += qf[g][i] * kfb[i]; }}
            #pragma unroll
            for (int off = LANES / 2; off > 0; off >>= 1) {{
                sa += __shfl_xor_sync(0xffffffffu, sa, off);
                sb += __shfl_xor_sync(0xffffffffu, sb, off);
            }}
            sa = va ? sa : NEG_INF; sb = vb_ ? sb : NEG_INF;
            const float top = fmaxf(m[g], fmaxf(sa, sb));
            if (top == NEG_INF) continue;                     // nothing seen yet, nothing now
            const float c = exp2f(m[g] - top), ea = exp2f(sa - top), eb = exp2f(sb - top);
            l[g] = l[g] * c + ea + eb;
            #pragma unroll
            for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * c + ea * vfa[i] + eb * vfb[i];
            m[g] = top;
        }}
    }}
    #pragma unroll
    for (int g = 0; g < G; ++g) {{
        if (lane == 0) {{ sm_m[grp][g] = m[g]; sm_l[grp][g] = l[g]; }}
        #pragma unroll
        for (int i = 0; i < 8; ++i) sm_acc[(grp * G + g) * D + lane * 8 + i] = acc[g][i];
    }}
    __syncthreads();
    for (int t = threadIdx.x; t < G * D; t += {threads}) {{
        const int g = t / D, d = t % D;
        float top = NEG_INF, sum = 0.0f, o = 0.0f;
        for (int r = 0; r < GROUPS; ++r) top = fmaxf(top, sm_m[r][g]);
        if (top != NEG_INF)
            for (int r = 0; r < GROUPS; ++r) {{
                const float f = exp2f(sm_m[r][g] - top);
                sum += sm_l[r][g] * f;
                o += sm_acc[(r * G + g) * D + d] * f;
            }}
        const long long row = (b * kv + h) * G + g;
        if (splits == 1) {{
            out[row * D + d] = f2bf(sum > 0.0f ? o / sum : 0.0f);
        }} else {{
            float* pp = part + (row * splits + split) * (D + 2);
            pp[d] = o;
            if (d == 0) {{ pp[D] = top; pp[D + 1] = sum; }}
        }}
    }}
}}
extern "C" __global__ void moe_decode_attention_merge(const float* __restrict__ part, int splits,
                                                      unsigned short* __restrict__ out) {{
    // one block per (batch entry, query head): the splits' partial softmaxes -> the output
    const long long row = blockIdx.x;
    const float* pp = part + row * splits * (D + 2);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {{
        float top = NEG_INF, sum = 0.0f, o = 0.0f;
        for (int r = 0; r < splits; ++r) top = fmaxf(top, pp[r * (D + 2) + D]);
        if (top != NEG_INF)
            for (int r = 0; r < splits; ++r) {{
                const float f = exp2f(pp[r * (D + 2) + D] - top);
                sum += pp[r * (D + 2) + D + 1] * f;
                o += pp[r * (D + 2) + d] * f;
            }}
        out[row * D + d] = f2bf(sum > 0.0f ? o / sum : 0.0f);
    }}
}}
"""
_DECODE_MAX_GROUP = 8              # query heads per kv head held in registers


@functools.lru_cache(maxsize=None)
def _decode_module(group: int, D: int):
    return cp.RawModule(code=_BF16_HELPERS + _DECODE_SRC.format(G=group, D=D, threads=_DECODE_THREADS),
                        options=("-std=c++14",))


def fused_decode_shapes(heads: int, kv_heads: int, D: int, Dv: int) -> bool:
    """Whether the fused decode kernel takes these head shapes: equal k and v widths of 64, 128
    or 256 (a row is D/8 lanes of 16-byte loads) and at most 8 query heads per kv head."""
    return D == Dv and D in (64, 128, 256) and heads % kv_heads == 0 and heads // kv_heads <= _DECODE_MAX_GROUP


def fused_decode_supports(q, k, v) -> bool:
    """``fused_decode_shapes`` of these arrays, with 16-byte aligned cache rows (strides in whole
    8-element vectors) and q heads of the cache's width."""
    aligned = all(st % 16 == 0 for x in (k, v) for st in x.strides[:3]) and \
        all(x.data.ptr % 16 == 0 for x in (k, v)) and k.strides[3] == v.strides[3] == 2
    return fused_decode_shapes(q.shape[2], k.shape[2], k.shape[3], v.shape[3]) and q.shape[3] == k.shape[3] and aligned


def _decode_splits(blocks: int, positions: int) -> int:
    """Position splits per (sequence, kv head): enough blocks for two waves over the SMs, never
    a split of fewer than 256 positions."""
    want = -(-2 * _sm_count(cp.cuda.Device().id) // max(blocks, 1))
    return max(1, min(want, positions // 256))


def fused_decode_attention(q, k, v, last, scale: float, rows=None):
    """``model.attention.decode_attention`` in one pass over the cache (see above). q: [B, 1, nh,
    D]; k, v: [S, Lk, kv, D] bf16 cache parts (any sequence and position strides); last: [B]
    ints; rows: [B] the cache row of each batch entry (None: entry b is row b) -> [B, 1, nh D]
    bf16. Scores, softmax and output accumulate in fp32; nothing is rounded before the output."""
    B, _, nh, D = q.shape
    Lk, kv = k.shape[1], k.shape[2]
    out = cp.empty((B, 1, nh * D), BF16)
    if B == 0:
        return out
    # q may be a view of the fused projection's rows (heads contiguous, any row stride): read in
    # place where its rows are 16-byte vectors, so a step copies no q
    if not (q.strides[2:] == (2 * D, 2) and q.strides[0] % 16 == 0 and q.data.ptr % 16 == 0):
        q = cp.ascontiguousarray(q)
    assert q.data.ptr % 16 == 0, "the kernel reads q in 16-byte vectors"
    last = cp.ascontiguousarray(cp.asarray(last), dtype=cp.int64)
    rows = None if rows is None else cp.ascontiguousarray(cp.asarray(rows), dtype=cp.int64)
    splits = _decode_splits(B * kv, Lk)
    chunk = -(-Lk // splits)
    part = cp.empty((B * nh, splits, D + 2), cp.float32) if splits > 1 else None
    module = _decode_module(nh // kv, D)
    st = [x // 2 for x in k.strides[:3]], [x // 2 for x in v.strides[:3]]
    module.get_function("moe_decode_attention")(
        (B * kv * splits,), (_DECODE_THREADS,),
        (_u16(q), np.int64(q.strides[0] // 2), _u16(k), *map(np.int64, st[0]), _u16(v), *map(np.int64, st[1]),
         rows if rows is not None else np.uint64(0), last, np.int32(kv), np.int32(splits), np.int64(chunk),
         np.float32(scale * 1.4426950408889634), _u16(out), part if part is not None else np.uint64(0)))
    if part is not None:
        module.get_function("moe_decode_attention_merge")((B * nh,), (min(D, 128),), (part, np.int32(splits), _u16(out)))
    return out


def _bias_act(h, b1, kind: str, rows_per_slot: int) -> None:
    """h: [..., F] bf16 (a strided view too), in place; slot i / (rows_per_slot F) takes b1[slot].
    The scalar fallback of ``_activate`` (rows that are not 16-byte vectors)."""
    F = h.shape[-1]
    empty = cp.empty(0, dtype=cp.uint16)
    _bias_act_kernel(kind, b1 is not None)(empty if b1 is None else _u16(b1), F,
                                           max(rows_per_slot, 1) * F, _u16(h))


@functools.lru_cache(maxsize=None)
def _bias_act_rows_kernel(kind: str):
    return cp.RawKernel(_BF16_HELPERS + f"""
extern "C" __global__ void moe_bias_act_rows(unsigned short* h, const unsigned short* b, int rows,
                                             long long stride, long long ld, int vecs,
                                             const long long* starts, const long long* slot_of) {{
    // one block per row of rows x slots (or x windows: window g's rows begin at starts[g], its
    // bias is slot_of[g]'s); 8 values per 16-byte vector; the slot (and so its bias row) is
    // worked out once per row, not per element (a 64-bit division per element cost 20x the
    // memory time of the dense MLP's activation)
    long long r = blockIdx.x, g = r / rows;
    long long slot = starts ? slot_of[g] : g, row = (starts ? starts[g] : g * stride) + r % rows;
    uint4* p = (uint4*)(h + row * ld);
    const uint4* bias = b ? (const uint4*)(b + slot * vecs * 8) : 0;
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {{
        uint4 x = p[i], y;
        if (bias) y = bias[i];
        unsigned short* xs = (unsigned short*)&x;
        const unsigned short* ys = (const unsigned short*)&y;
        #pragma unroll
        for (int q = 0; q < 8; ++q) {{
            float v = bf2f(xs[q]);
            if (bias) v += bf2f(ys[q]);
            v = {_ACTIVATIONS[kind]};
            xs[q] = f2bf(v);
        }}
        p[i] = x;
    }}
}}""", "moe_bias_act_rows")


def _bias_act_rows(h, b1, kind: str, slots: int, rows: int, stride: int, windows=None) -> bool:
    """In place on the first ``rows`` rows of each of ``slots`` slots of ``stride`` rows of the
    2-D h, bias row b1[slot] ([slots, F] or [F]) added first; or, with ``windows`` ([2, G] int64
    on the device: first row, slot), on ``rows`` rows from each window's first row. False
    (nothing done) where the rows are not 16-byte vectors."""
    F = h.shape[-1]
    ld = h.strides[0] // h.itemsize if h.shape[0] > 1 else F
    if F % 8 or ld % 8 or h.strides[-1] != h.itemsize or h.data.ptr % 16:
        return False
    bias = None if b1 is None else cp.ascontiguousarray(b1)
    if bias is not None and bias.data.ptr % 16:
        return False
    vecs = F // 8
    count = slots if windows is None else windows.shape[1]
    _bias_act_rows_kernel(kind)((count * rows,), (min(256, 32 * -(-vecs // 32)),),
                                (_u16(h), np.uint64(0) if bias is None else _u16(bias), np.int32(rows),
                                 np.int64(stride), np.int64(ld), np.int32(vecs), *_window_pointers(windows)))
    return True


def _window_pointers(windows):
    """The kernels' (starts, slot_of) arguments: null pointers without windows."""
    if windows is None:
        return np.uint64(0), np.uint64(0)
    return np.uint64(windows.data.ptr), np.uint64(windows.data.ptr + windows.strides[0])


def add_bias(y, bias):
    """See ``kernels.add_bias``: in place, one elementwise launch."""
    y = y if y.flags.c_contiguous else cp.ascontiguousarray(y)
    if y.size:
        _activate(y.reshape(-1, y.shape[-1]), bias, "identity", 1, y.size // y.shape[-1], y.size // y.shape[-1])
    return y


def expert_mlp(x, w1, b1, w2, kind: str, hidden=None, out=None):
    if x.shape[0] == 0:
        return out if out is not None else cp.empty((0, w2.shape[1]), BF16)
    h = gemm(x, w1, out=hidden)                 # bf16 operands, fp32 accumulate (cuBLAS)
    _activate(h, b1, kind, 1, x.shape[0], x.shape[0])
    if split_kind(kind)[0]:
        h = h[:, :w2.shape[0]]                  # act(gate) * up, written over the gate half
    return gemm(h, w2, out=out)                 # fp32 out: a tensor-parallel partial, unrounded


# ---------------------------------------------------------------- SMs left to communication
# cuBLAS's Hopper GEMMs fill every SM for their whole run, so a transfer's kernels launched on
# another stream wait for a GEMM to end before they get an SM: the exchange then runs between
# the expert GEMMs instead of beside them. cublasSetSmCountTarget (cuBLAS >= 11.x, not wrapped
# by CuPy) makes the expert GEMMs leave ``expert_gemm_carveout`` SMs free for the transport.
_SM_TARGET = {"carveout": 0, "set": None}


def _cublas_library():
    import ctypes
    for line in Path("/proc/self/maps").read_text().splitlines():
        name = line.rsplit(" ", 1)[-1]
        if "/libcublas.so" in name:
            return ctypes.CDLL(name)
    return None


_SETTER: list = []


def _sm_count_setter():
    """cuBLAS's cublasSetSmCountTarget, found in the process once cuBLAS is loaded (CuPy loads
    it with the first handle), or None where this cuBLAS has none."""
    if _SETTER:
        return _SETTER[0]
    import ctypes
    cp.cuda.device.get_cublas_handle()              # loads libcublas if nothing has yet
    lib = _cublas_library()
    setter = getattr(lib, "cublasSetSmCountTarget", None) if lib is not None else None
    if setter is not None:
        setter.argtypes, setter.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
    _SETTER.append(setter)
    return setter


def set_expert_gemm_carveout(sms: int) -> bool:
    """Leave ``sms`` SMs to other streams while the expert GEMMs run (0: all SMs to the GEMMs).
    Returns whether this cuBLAS can do it."""
    _SM_TARGET["carveout"] = max(0, int(sms))
    return _sm_count_setter() is not None or sms == 0


@contextlib.contextmanager
def _sm_target(handle):
    setter, carve = _sm_count_setter(), _SM_TARGET["carveout"]
    if setter is None or carve == 0:
        yield
        return
    total = _sm_count(cp.cuda.Device().id)
    setter(handle, max(total - carve, 3 * total // 4))     # never more than a quarter
    try:
        yield
    finally:
        setter(handle, 0)             # 0: cuBLAS's own choice again


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return cp.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]


def _batched_gemm(a, b, c, slots: int, rows: int | None = None) -> None:
    """c[s] = a[s] @ b[s] for s < slots; a: [S*C, >= K], b: [S, K, N] bf16; c: [S*C, >= N] bf16 or
    fp32; only the first ``rows`` rows of each slot (all C by default; the slot stride stays C).
    a and c may be wider than K and N (a gated MLP's [gate | up] buffer is read as its first F
    columns): their leading dimensions are their row strides.

    cuBLAS is column-major, so it computes c^T = b^T a^T with the operands swapped."""
    C, K, N = a.shape[0] // slots, b.shape[1], b.shape[2]
    lda, ldc = a.strides[0] // a.itemsize, c.strides[0] // c.itemsize     # row strides, views included
    assert a.strides[1] == a.itemsize and c.strides[1] == c.itemsize, "rows must be contiguous"
    m = C if rows is None else rows
    ctype = 0 if c.dtype == cp.float32 else 14                       # CUDA_R_32F or CUDA_R_16BF
    with _cublas_on_current_stream() as (cublas, handle, one, zero), _sm_target(handle):
        cublas.gemmStridedBatchedEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, N, m, K,
                                    one, b.data.ptr, 14, N, K * N,
                                    a.data.ptr, 14, lda, C * lda, zero,
                                    c.data.ptr, ctype, ldc, C * ldc, slots,
                                    cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)


def _window_gemm(a, b, c, starts: np.ndarray, slots: np.ndarray, rows: int) -> None:
    """c[w] = a[w] @ b[slots[g]] for the windows w of ``rows`` rows from row starts[g] of a and
    c, every window in one cuBLAS launch (device arrays of pointers). a: [R, >= K], b: [S, K, N]
    bf16; c: [R, >= N] bf16 or fp32; leading dimensions as in ``_batched_gemm``."""
    G, K, N = len(starts), b.shape[1], b.shape[2]
    lda, ldc = a.strides[0] // a.itemsize, c.strides[0] // c.itemsize
    assert a.strides[1] == a.itemsize and c.strides[1] == c.itemsize, "rows must be contiguous"
    starts, slots = np.asarray(starts, np.int64), np.asarray(slots, np.int64)
    pointers = cp.asarray(np.concatenate([b.data.ptr + slots * (K * N * b.itemsize),
                                          a.data.ptr + starts * (lda * a.itemsize),
                                          c.data.ptr + starts * (ldc * c.itemsize)]).astype(np.uint64))
    ctype = 0 if c.dtype == cp.float32 else 14                       # CUDA_R_32F or CUDA_R_16BF
    base = pointers.data.ptr
    with _cublas_on_current_stream() as (cublas, handle, one, zero), _sm_target(handle):
        cublas.gemmBatchedEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, N, rows, K,
                             one, base, 14, N, base + 8 * G, 14, lda, zero, base + 16 * G, ctype, ldc, G,
                             cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)


def grouped_expert_mlp(x, counts, w1, b1, w2, kind: str, hidden, out):
    """See ``kernels.grouped_expert_mlp``: one batched GEMM pair over the first m rows of every
    slot, and the heavy slots' tails by window size (``expert_batches.batched_rows``). (cuBLAS's grouped
    GEMM over exact rows ran a CUTLASS sm80 kernel on the H200 at half this speed:
    docs/performance.md.)"""
    S = len(counts)
    if S == 0 or x.shape[0] == 0:
        return out
    C = x.shape[0] // S
    m, heavy = batched_rows(counts, C)
    if m:
        _batched_gemm(x, w1, hidden, S, m)
        _activate(hidden, b1, kind, S, m, C)
        _batched_gemm(hidden, w2, out, S, m)
    # the tails' windows, a few sizes: the windows of one size are one GEMM, activation, GEMM
    # (pointer-batched), after the batched pass, so rows a window shares with it are recomputed
    # from x, never activated twice; windows of one slot never meet (one per heavy slot)
    starts, sizes = tail_windows(np.asarray(counts)[heavy], m, C)
    _tail_mlps(x, w1, b1, w2, kind, hidden, out, heavy * C + starts, heavy, sizes)
    return out


def _tail_mlps(x, w1, b1, w2, kind: str, hidden, out, first: np.ndarray, slots: np.ndarray, sizes: np.ndarray):
    """The expert MLP over windows of rows: window g is sizes[g] rows from row first[g], with
    slot slots[g]'s weights; the windows of one size are one pointer-batched GEMM, one
    activation, one GEMM."""
    for n in np.unique(sizes).tolist():
        pick = sizes == n
        _window_gemm(x, w1, hidden, first[pick], slots[pick], n)
        _activate_windows(hidden, b1, kind, first[pick], slots[pick], n)
        _window_gemm(hidden, w2, out, first[pick], slots[pick], n)


def packed_expert_mlp(x, packed, w1, b1, w2, kind: str, hidden, out):
    """See ``kernels.packed_expert_mlp``: each run of consecutive busy slots one batched GEMM
    pair over its first m rows (stride m), then the heavy slots' tail windows of each size in
    one pointer-batched GEMM pair and one activation. The tails lie apart from the batched rows,
    so nothing is computed twice."""
    m, slots = packed.m, packed.slots
    bias = lambda s0, s1: None if b1 is None else b1[s0:s1]
    if m:
        for p0, p1 in packed.runs():
            s0, s1, rows = int(slots[p0]), int(slots[p0]) + p1 - p0, slice(p0 * m, p1 * m)
            _batched_gemm(x[rows], w1[s0:s1], hidden[rows], p1 - p0, m)
            _activate(hidden[rows], bias(s0, s1), kind, p1 - p0, m, m)
            _batched_gemm(hidden[rows], w2[s0:s1], out[rows], p1 - p0, m)
    _tail_mlps(x, w1, b1, w2, kind, hidden, out, packed.tail_start, slots[packed.heavy], packed.tail_rows)
    return out


_STATIC_DISPATCH = cp.RawKernel(r"""
extern "C" __global__ void moe_static_dispatch(const int* experts, int n, int k, long long capacity,
                                               int num_experts, long long* dst, long long* src) {
    // one block: choice i's place among its expert's choices, in order (one thread walks the
    // few choices of a decode step; the order, and so every row's place, is deterministic)
    extern __shared__ int seen[];
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) seen[e] = 0;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int i = 0; i < n; ++i) { const int e = experts[i]; dst[i] = e * capacity + seen[e]++; }
    for (int i = threadIdx.x; i < n; i += blockDim.x) src[i] = i / k;
}
""", "moe_static_dispatch")


def static_dispatch(experts, capacity: int, num_experts: int):
    """See ``kernels.static_dispatch``: one single-block launch, nothing read back."""
    T, k = experts.shape
    dst, src = cp.empty((T, k), cp.int64), cp.empty(T * k, cp.int64)
    if T:
        _STATIC_DISPATCH((1,), (256,), (cp.ascontiguousarray(experts, dtype=cp.int32), np.int32(T * k), np.int32(k),
                                        np.int64(capacity), np.int32(num_experts), dst, src),
                         shared_mem=4 * num_experts)
    return dst, src


def padded_expert_mlp(x, w1, b1, w2, kind: str):
    """See ``kernels.padded_expert_mlp``: one strided-batched GEMM per product over every slot."""
    S = w1.shape[0]
    hidden = cp.empty((x.shape[0], w1.shape[2]), BF16)
    out = cp.empty((x.shape[0], w2.shape[2]), BF16)
    C = x.shape[0] // S
    _batched_gemm(x, w1, hidden, S)
    _activate(hidden, b1, kind, S, C, C)
    _batched_gemm(hidden, w2, out, S)
    return out


def _activate(h, b1, kind: str, slots: int, rows: int, stride: int) -> None:
    """In place on the first ``rows`` rows of each of ``slots`` slots of ``stride`` rows in h:
    bias + activation, or for a gated kind act(gate + b) * (up + b) into the first half."""
    gated, act = split_kind(kind)
    if gated:
        _gated(h, b1, act, slots, rows, stride)
    elif slots * rows and not _bias_act_rows(h, b1, kind, slots, rows, stride):
        F = h.shape[-1]
        _bias_act(h.reshape(slots, stride, F)[:, :rows], b1, kind, rows)


def _activate_windows(h, b1, kind: str, starts: np.ndarray, slots: np.ndarray, rows: int) -> None:
    """``_activate`` on ``rows`` rows from each row starts[g] of h, bias row b1[slots[g]]: one
    launch for every window of a size (the scalar fallback loops over them)."""
    gated, act = split_kind(kind)
    windows = cp.asarray(np.stack([starts, slots]).astype(np.int64))
    if gated:
        _gated(h, b1, act, 0, rows, 0, windows)
    elif not _bias_act_rows(h, b1, kind, 0, rows, 0, windows):
        for a, s in zip(starts.tolist(), slots.tolist()):
            _activate(h[a:a + rows], None if b1 is None else b1[s:s + 1], kind, 1, rows, rows)


@functools.lru_cache(maxsize=None)
def _gated_kernel(kind: str):
    act = _ACTIVATIONS[kind]
    return cp.RawKernel(_BF16_HELPERS + f"""
extern "C" __global__ void moe_gated(unsigned short* h, const unsigned short* b1, int has_bias,
                                     int rows, long long stride, int F,
                                     const long long* starts, const long long* slot_of) {{
    // one block per row: h[row] = [gate | up] (2F) -> act(gate) * up into its first F columns;
    // rows by slot, or by window (see moe_bias_act_rows)
    long long g = blockIdx.x / rows;
    long long s = starts ? slot_of[g] : g, row = (starts ? starts[g] : g * stride) + blockIdx.x % rows;
    unsigned short* r = h + row * 2 * F;
    for (int j = threadIdx.x; j < F; j += blockDim.x) {{
        float v = bf2f(r[j]), u = bf2f(r[F + j]);
        if (has_bias) {{ v += bf2f(b1[s * 2 * F + j]); u += bf2f(b1[s * 2 * F + F + j]); }}
        v = {act};
        r[j] = f2bf(v * u);
    }}
}}""", "moe_gated")


def _gated(h, b1, kind: str, slots: int, rows: int, stride: int, windows=None) -> None:
    F = h.shape[-1] // 2
    count = slots if windows is None else windows.shape[1]
    if count * rows == 0:
        return
    bias = _u16(b1) if b1 is not None else _u16(h)
    _gated_kernel(kind)((count * rows,), (min(1024, 32 * ((F + 31) // 32)),),
                        (_u16(h), bias, np.int32(b1 is not None), np.int32(rows), np.int64(stride), np.int32(F),
                         *_window_pointers(windows)))


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
