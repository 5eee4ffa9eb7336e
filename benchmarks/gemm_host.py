"""Host time per cuBLAS call through ``device/kernels_cuda.py``, by call kind: a shape cuBLAS has
seen before against a new one at each call (the expert GEMMs' row counts). On the device machine:

    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gemm_host.py

Prints microseconds of host time per call (the calls return before the GPU finishes).
"""
import time

import cupy as cp
import ml_dtypes

from moe_hpc.device import kernels_cuda as kc

BF16 = ml_dtypes.bfloat16
SLOTS, CAPACITY, H, F = 64, 640, 7168, 2048          # the 61-layer preset's expert shapes


def host_us(fn, calls: int = 30) -> float:
    """Mean host time of one call after a first one, the GPU drained before and after."""
    fn()
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t) / calls * 1e6
    cp.cuda.Device().synchronize()
    return dt


def main() -> None:
    x, w1 = cp.zeros((SLOTS * CAPACITY, H), BF16), cp.zeros((SLOTS, H, F), BF16)
    h = cp.empty((SLOTS * CAPACITY, F), BF16)
    rows = iter(range(16, 16 * 400, 16))
    tails = iter(range(8, 8 * 400, 8))
    a, b = cp.zeros((512, H), BF16), cp.zeros((H, F), BF16)
    figures = {
        "batched, same rows": lambda: kc._batched_gemm(x, w1, h, SLOTS, 512),
        "batched, new rows each call": lambda: kc._batched_gemm(x, w1, h, SLOTS, next(rows) % CAPACITY or 8),
        "one slot, new rows each call": lambda: kc._batched_gemm(x[:next(tails) % 600 + 8], w1[:1], h[:600], 1),
        "gemm, same shape": lambda: kc.gemm(a, b, out=cp.empty((512, F), cp.float32), dtype=cp.float32),
        "cupy.matmul, same shape": lambda: cp.matmul(a, b),
    }
    for name, fn in figures.items():
        print(f"{name:<30} {host_us(fn):9.1f} us")


if __name__ == "__main__":
    main()
