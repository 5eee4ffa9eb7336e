"""Report which CuPy/bf16/NCCL/MPI features this GPU machine has (what moe_hpc relies on).

    python3 benchmarks/probe_gpu.py
"""
import subprocess
import traceback

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def check(name, fn):
    try:
        print(f"ok   {name}: {fn()}")
    except Exception as exc:
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:200]}")


def main():
    import cupy as cp
    print("cupy", cp.__version__, "devices", cp.cuda.runtime.getDeviceCount(),
          cp.cuda.runtime.getDeviceProperties(0)["name"])
    x = cp.asarray(np.random.default_rng(0).standard_normal((64, 32)).astype(BF16))
    check("bf16 asarray", lambda: x.dtype)
    check("bf16 astype f32", lambda: float(x.astype(cp.float32).sum()))
    check("f32 astype bf16", lambda: x.astype(cp.float32).astype(BF16).dtype)
    check("bf16 bool index", lambda: x[cp.arange(64) % 2 == 0].shape)
    check("bf16 take", lambda: cp.take(x, cp.arange(3), axis=0).shape)
    check("bf16 setitem idx", lambda: x.__setitem__(cp.arange(2), x[:2]) or "set")
    check("bf16 add", lambda: (x + x).dtype)
    check("bf16 matmul", lambda: cp.matmul(x, x.T).dtype)
    check("bf16 empty_like", lambda: cp.empty_like(x).dtype)
    check("bf16 where", lambda: cp.where(cp.ones((64, 1), bool), x, x).dtype)
    check("argsort kind=stable", lambda: cp.argsort(cp.arange(5)[::-1], kind="stable").tolist())
    check("bincount", lambda: cp.bincount(cp.arange(5), minlength=8).tolist())
    from cupy.cuda import nccl
    check("nccl version", lambda: nccl.get_version())
    check("nccl send attr", lambda: hasattr(nccl.NcclCommunicator, "send"))
    from mpi4py import MPI
    check("mpi library", lambda: MPI.Get_library_version().splitlines()[0])
    check("MPI.Query_cuda_support", lambda: MPI.Query_cuda_support())
    check("ompi_info cuda", lambda: subprocess.run("ompi_info --parsable --all | grep mpi_built_with_cuda_support",
                                                   shell=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
