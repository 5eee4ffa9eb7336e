"""Shared fixtures: tiny weights and inputs made once per session, a long input and its
uninterrupted outputs (the resume tests' reference), and an mpiexec runner.

MPI tests start real ranks with ``mpiexec`` as a subprocess, always under a timeout, so a hang
fails the test instead of the CI job. Stopping and killing ranks mid-run: interrupting.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from interrupting import remove_stale_shm, shm_segments
from moe_hpc.config import build_config
from moe_hpc.synth import write_checkpoint, write_inputs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "inputs" / "tiny.toml"
MPI_TIMEOUT = 120


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the [mpi] extra's MPICH) first, then PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (install the [mpi] extra)")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def rank_env(**extra) -> dict:
    """The environment of test ranks: one BLAS thread each (ranks share 2 cores in CI)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1", **extra)


def moe_hpc_cmd(*args, ranks: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "moe_hpc.cli", *map(str, args)]
    return cmd if ranks is None else [MPIEXEC, "-n", str(ranks), *cmd]


def transform_dataset(name: str, fn):
    """An h5py edit: replace dataset ``name`` by ``fn(its data)`` (for making bad files)."""
    def edit(f):
        data = fn(f[name][()])
        del f[name]
        f.create_dataset(name, data=data)
    return edit


def moe_hpc(*args, ranks: int | None = None, timeout: float = MPI_TIMEOUT, cwd=None) -> Result:
    """Run ``moe-hpc ARGS`` as one process, or under ``mpiexec -n ranks``."""
    proc = subprocess.run(moe_hpc_cmd(*args, ranks=ranks), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=rank_env())
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------- output equality

def assert_same_output(a: Path, b: Path, scratch: Path, timing_attr: str = "wall_time_s") -> None:
    """Bit for bit: the two files' bytes are equal once the wall-time attribute (which a resumed
    run cannot share) is set to 0 in copies of both; then every dataset is equal too."""
    copies = []
    for i, path in enumerate((a, b)):
        copy = scratch / f"same-output-{i}.h5"
        shutil.copy(path, copy)
        with h5py.File(copy, "r+") as f:
            f.attrs.modify(timing_attr, 0.0)          # in place: same size, same place
        copies.append(np.fromfile(copy, np.uint8))
    assert copies[0].size == copies[1].size, f"{a} has {copies[0].size} bytes, {b} {copies[1].size}"
    differ = np.flatnonzero(copies[0] != copies[1])
    assert differ.size == 0, f"{a} and {b} differ at byte(s) {differ[:20]}"


@pytest.fixture(scope="session")
def tiny_cfg():
    return build_config({}, where="<tiny>")


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tiny_cfg):
    """(weights, inputs with /lengths) for the tiny model: 6 ragged sequences of 24 positions."""
    d = tmp_path_factory.mktemp("tiny")
    weights, inputs = d / "weights.h5", d / "inputs.h5"
    write_checkpoint(weights, tiny_cfg.model, seed=3)
    write_inputs(inputs, tiny_cfg.model, sequences=6, seq_len=24, seed=4, ragged=True)
    return weights, inputs


# ---------------------------------------------------------------- a run long enough to interrupt

CHUNKED = ["--set", "run.chunk_sequences=1"]      # many chunks, so a signal lands mid-run


@pytest.fixture(scope="session")
def long_input(tmp_path_factory, tiny_cfg):
    """40 ragged sequences: 20 one-sequence chunks per dense rank on 2 dense ranks."""
    path = tmp_path_factory.mktemp("long") / "inputs.h5"
    write_inputs(path, tiny_cfg.model, sequences=40, seq_len=32, seed=7, ragged=True)
    return path


def run_args(weights, inputs, output, *extra):
    return ["run", TINY, "--weights", weights, "--input", inputs, "--output", output, *CHUNKED, *extra]


@pytest.fixture(scope="session")
def uninterrupted(tiny_files, long_input, tmp_path_factory):
    """{(ranks, sets): output} of uninterrupted runs, made on first use."""
    made, folder = {}, tmp_path_factory.mktemp("uninterrupted")

    def get(ranks, sets=()):
        if (ranks, sets) not in made:
            out = folder / f"n{ranks}-{len(made)}.h5"
            r = moe_hpc(*run_args(tiny_files[0], long_input, out, *sets), ranks=ranks)
            assert r.returncode == 0, r.stderr
            made[(ranks, sets)] = out
        return made[(ranks, sets)]
    return get


@pytest.fixture
def no_stale_shm():
    """For tests that kill ranks: clean the shared memory the killed ranks leave behind."""
    before = shm_segments()
    yield
    remove_stale_shm(before)
