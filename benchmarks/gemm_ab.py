"""bf16 GEMMs through CuPy's ``cupy.matmul`` against ``kernels_cuda.gemm`` (cuBLAS by ctypes,
the device's workspace, strided views read in place) on the model's shapes, in one run.

    python3 benchmarks/gemm_ab.py
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from moe_hpc.device.dtypes import BF16
from moe_hpc.device.kernels_cuda import gemm

SHAPES = [  # (name, M, K, N, weight as a column block of a 3x wider one)
    ("dense MLP up 16384x7168x18432", 16384, 7168, 18432, False),
    ("dense MLP down 16384x18432x7168", 16384, 18432, 7168, False),
    ("fused QKV 16384x7168x49152", 16384, 7168, 49152, False),
    ("q of the fused QKV (view) 16384x7168x16384", 16384, 7168, 16384, True),
    ("decode q of the fused QKV (view) 64x7168x16384", 64, 7168, 16384, True),
    ("decode dense MLP up 64x7168x18432", 64, 7168, 18432, False),
]


def timed(fn, iters: int = 10) -> float:
    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / iters * 1e-3


def main() -> None:
    rng = cp.random.default_rng(0)
    for name, M, K, N, view in SHAPES:
        a = (rng.standard_normal((M, K), dtype=cp.float32)).astype(BF16)
        w = (rng.standard_normal((K, 3 * N if view else N), dtype=cp.float32) * K ** -0.5).astype(BF16)
        b = w[:, :N] if view else w
        t_cupy = timed(lambda: cp.matmul(a, b))
        t_ours = timed(lambda: gemm(a, b))
        flops, moved = 2.0 * M * K * N, 2.0 * (M * K + K * N + M * N)
        diff = float(cp.abs(gemm(a, b).astype(cp.float32) - cp.matmul(a, b).astype(cp.float32)).max())
        print(f"{name:48s} cupy.matmul {t_cupy * 1e3:8.3f} ms {flops / t_cupy / 1e12:6.0f} TFLOP/s "
              f"{moved / t_cupy / 1e12:5.2f} TB/s | gemm {t_ours * 1e3:8.3f} ms {flops / t_ours / 1e12:6.0f} TFLOP/s "
              f"{moved / t_ours / 1e12:5.2f} TB/s | max diff {diff:.3g}")


if __name__ == "__main__":
    np.random.seed(0)
    main()
