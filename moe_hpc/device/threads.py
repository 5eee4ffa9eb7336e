"""BLAS and OpenMP threads per rank: each rank's share of its node's cores.

NumPy's OpenBLAS starts one thread per core in every process. Under ``mpiexec -n 4`` on a
4-core node that is 16 threads fighting for 4 cores, and the GEMMs of all ranks slow down
together (several times over: docs/performance.md). So each rank limits its BLAS/OpenMP pools to
``cores // ranks_on_node`` (at least 1) as the run starts, through threadpoolctl, which finds
the loaded OpenBLAS/MKL/BLIS/OpenMP libraries and calls their own ``set_num_threads``.

An explicit thread variable (``OMP_NUM_THREADS`` and the BLAS libraries' own) wins: the user
said how many, and the libraries read it themselves.
"""
from __future__ import annotations

import os

# Each of these sets a BLAS or OpenMP pool's size when the library loads; any one given wins.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity mask: what Slurm's cgroup or a launcher's
    binding allows), or every core where the system cannot say."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:       # no affinity call (macOS)
        return list(range(os.cpu_count() or 1))


def thread_share(cores: int, ranks: int) -> int:
    """Threads per rank when ``ranks`` processes share ``cores`` cores: at least 1."""
    return max(1, cores // max(1, ranks))


def explicit_threads(environ=os.environ) -> str | None:
    """``"OMP_NUM_THREADS=4"`` when the user set a thread variable, else None."""
    for name in THREAD_VARIABLES:
        if environ.get(name, "").strip():
            return f"{name}={environ[name].strip()}"
    return None


def limit_blas_threads(cores: int, ranks: int, environ=os.environ) -> str:
    """Limit this process's BLAS/OpenMP pools to its share of ``cores`` (shared by ``ranks``
    ranks) unless a thread variable is set; -> what the start line says about it."""
    given = explicit_threads(environ)
    if given:
        return f"BLAS threads from {given}"
    from threadpoolctl import threadpool_limits
    n = thread_share(cores, ranks)
    threadpool_limits(limits=n)        # not as a context: the limit holds for the whole run
    return f"{n} BLAS thread{'s' if n > 1 else ''} per rank ({cores} core(s) shared by {ranks} rank(s))"


__all__ = ["THREAD_VARIABLES", "usable_cores", "thread_share", "explicit_threads", "limit_blas_threads"]
