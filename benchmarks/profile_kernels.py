"""GPU kernel time by kernel name over a window of engine calls of a ``moe-hpc bench`` command,
read through PyTorch's profiler (CUPTI sees every kernel of the process, CuPy's and cuBLAS's
included). A measuring aid for the device machine, where torch is installed; never a
dependency of the package.

    python3 benchmarks/profile_kernels.py --method forward_cached --skip 8 --calls 8 -- \\
        bench --transport nccl --micro-batches 1 --model-layers 8 --iters 1 --warmup 3 \\
        --decode --decode-batch 64 --prompt-len 1024 --new-tokens 24

profiles calls 9..16 of ``Engine.forward_cached`` whose input has one position (decode steps);
``--method forward_chunk`` profiles whole-model forwards instead. Prints the kernels by total
GPU time, per call, and the window's GPU-busy share.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moe_hpc.cli import main as moe_hpc_main
from moe_hpc.runtime.engine import Engine


def _window(method: str, skip: int, calls: int, prof, seen: list, wall: list):
    """A wrapper of Engine.<method> that starts the profiler before call ``skip`` + 1 of the
    kind profiled and stops it after ``calls`` more."""
    original = getattr(Engine, method)

    def wrapped(self, *args, **kwargs):
        counted = method != "forward_cached" or args[0].shape[1] == 1        # decode steps only
        if counted and len(seen) == skip:
            torch.cuda.synchronize()
            prof.start()
            wall.append(time.perf_counter())
        out = original(self, *args, **kwargs)
        if counted:
            seen.append(1)
            if len(seen) == skip + calls:
                torch.cuda.synchronize()
                wall.append(time.perf_counter())
                prof.stop()
        return out
    setattr(Engine, method, wrapped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="forward_cached", choices=["forward_cached", "forward_chunk"])
    p.add_argument("--skip", type=int, default=8)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the moe-hpc arguments")
    a = p.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    prof, seen, wall = profile(activities=[ProfilerActivity.CUDA]), [], []
    _window(a.method, a.skip, a.calls, prof, seen, wall)
    moe_hpc_main(argv)
    if len(wall) < 2:
        raise SystemExit(f"error: the command made {len(seen)} {a.method} calls, fewer than --skip + --calls")
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: -e.device_time_total)
    busy = sum(e.device_time_total for e in kernels) / 1e3 / a.calls           # ms per call
    span = (wall[1] - wall[0]) * 1e3 / a.calls
    print(f"profile: {a.calls} {a.method} calls after {a.skip}; per call: wall {span:.3f} ms, "
          f"kernels {busy:.3f} ms ({100 * busy / span:.0f}% busy), {sum(e.count for e in kernels) / a.calls:.0f} kernels")
    print(f"{'ms/call':>9} {'share':>6} {'count/call':>10}  kernel")
    for e in kernels[:a.top]:
        ms = e.device_time_total / 1e3 / a.calls
        print(f"{ms:9.3f} {100 * ms / busy:5.1f}% {e.count / a.calls:10.1f}  {e.key[:110]}")


if __name__ == "__main__":
    main()
