"""GPU kernel time by kernel name over a window of engine calls of a ``moe-hpc bench`` command,
read through PyTorch's profiler (CUPTI sees every kernel of the process, CuPy's and cuBLAS's
included). A measuring aid for the device machine, where torch is installed; never a
dependency of the package.

    python3 benchmarks/profile_kernels.py --method forward_cached --skip 8 --calls 8 -- \\
        bench --transport nccl --micro-batches 1 --model-layers 8 --iters 1 --warmup 3 \\
        --decode --decode-batch 64 --prompt-len 1024 --new-tokens 24

profiles calls 9..16 of ``Engine.forward_cached`` whose input has one position (decode steps);
``--method forward_chunk`` profiles whole-model forwards instead. Prints the kernels by total
GPU time, per call, and the window's GPU-busy share; ``--method prefill`` profiles the
prompts' forward_cached calls instead, and ``--gaps N`` adds where the GPU sat idle.
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
    kind profiled and stops it after ``calls`` more. ``prefill``: forward_cached calls over
    prompts (more than one position); ``forward_cached``: its decode steps (one position)."""
    prefill = method == "prefill"
    method = "forward_cached" if prefill else method
    original = getattr(Engine, method)

    def wrapped(self, *args, **kwargs):
        counted = method != "forward_cached" or (args[0].shape[1] == 1) != prefill
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
    p.add_argument("--method", default="forward_cached", choices=["forward_cached", "prefill", "forward_chunk"])
    p.add_argument("--skip", type=int, default=8)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--gaps", type=int, default=0, metavar="N",
                   help="also print the N largest idle sums between kernels, by (kernel before, kernel after)")
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
    if a.gaps:
        _print_gaps(prof, a.calls, a.gaps)


def _print_gaps(prof, calls: int, top: int) -> None:
    """Idle GPU time between consecutive kernels, summed by the pair around each gap: where the
    device waited for the host (a sync, a host-side plan, a launch storm)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    pairs, end, before = {}, None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            key = (before[:48], name[:48])
            total, count = pairs.get(key, (0.0, 0))
            pairs[key] = (total + start - end, count + 1)
        if end is None or stop > end:
            end, before = stop, name
    idle = sum(t for t, _ in pairs.values()) / 1e3 / calls
    print(f"idle between kernels: {idle:.3f} ms per call")
    print(f"{'ms/call':>9} {'gaps/call':>9}  kernel before -> kernel after")
    for (b, n), (t, c) in sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{t / 1e3 / calls:9.3f} {c / calls:9.1f}  {b} -> {n}")


if __name__ == "__main__":
    main()
