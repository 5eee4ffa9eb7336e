"""BLAS threads per rank (device/threads.py, issue 21 item 10): without a thread variable each
rank limits its BLAS/OpenMP pools to its share of the node's cores and the start line says so;
an explicit ``OMP_NUM_THREADS`` wins."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from helpers import MPIEXEC, MPI_TIMEOUT, TINY, needs_mpiexec
from moe_hpc.device.threads import limit_blas_threads, thread_share, usable_cores


def blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


@pytest.mark.parametrize("cores, ranks, share", [(2, 4, 1), (2, 2, 1), (16, 4, 4), (64, 3, 21), (8, 1, 8)])
def test_each_rank_gets_its_share_of_the_cores(cores, ranks, share):
    assert thread_share(cores, ranks) == share


def test_the_limit_is_applied_to_numpys_blas():
    if not blas_threads():
        pytest.skip("NumPy's BLAS is not visible to threadpoolctl")
    with threadpool_limits(limits=None):      # restores the pools afterwards
        said = limit_blas_threads(cores=6, ranks=3, environ={})
        assert blas_threads() == {2}
        assert said == "2 BLAS threads per rank (6 core(s) shared by 3 rank(s))"
        assert limit_blas_threads(cores=2, ranks=4, environ={}).startswith("1 BLAS thread per rank")
        assert blas_threads() == {1}


def test_an_explicit_thread_variable_wins():
    with threadpool_limits(limits=None):
        before = blas_threads()
        said = limit_blas_threads(cores=64, ranks=1, environ={"OMP_NUM_THREADS": "3"})
        assert said == "BLAS threads from OMP_NUM_THREADS=3"
        assert blas_threads() == before


def _run(tiny_files, tmp_path, ranks: int, **env_extra) -> str:
    """stderr of ``mpiexec -n ranks moe-hpc run`` with no thread variable unless given."""
    weights, inputs = tiny_files
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}
    env.update(PYTHONUNBUFFERED="1", **env_extra)
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "moe_hpc.cli", "run", str(TINY), "--weights",
           str(weights), "--input", str(inputs), "--output", str(tmp_path / "out.h5"), "--progress", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MPI_TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@needs_mpiexec
def test_start_line_says_the_threads_per_rank(tiny_files, tmp_path):
    cores = len(usable_cores())
    n = thread_share(cores, 2)
    stderr = _run(tiny_files, tmp_path, 2)
    word = "thread" if n == 1 else "threads"
    assert f"{n} BLAS {word} per rank ({cores} core(s) shared by 2 rank(s))" in stderr, stderr


@needs_mpiexec
def test_start_line_names_the_users_omp_num_threads(tiny_files, tmp_path):
    stderr = _run(tiny_files, tmp_path, 2, OMP_NUM_THREADS="1")
    assert "BLAS threads from OMP_NUM_THREADS=1" in stderr, stderr
