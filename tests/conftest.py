"""Shared fixtures: tiny weights and inputs made once per session, and an mpiexec runner.

MPI tests start real ranks with ``mpiexec`` as a subprocess, always under a timeout, so a hang
fails the test instead of the CI job.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def transform_dataset(name: str, fn):
    """An h5py edit: replace dataset ``name`` by ``fn(its data)`` (for making bad files)."""
    def edit(f):
        data = fn(f[name][()])
        del f[name]
        f.create_dataset(name, data=data)
    return edit


def moe_hpc(*args, ranks: int | None = None, timeout: float = MPI_TIMEOUT, cwd=None) -> Result:
    """Run ``moe-hpc ARGS`` as one process, or under ``mpiexec -n ranks``."""
    cmd = [sys.executable, "-m", "moe_hpc.cli", *map(str, args)]
    if ranks is not None:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


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
