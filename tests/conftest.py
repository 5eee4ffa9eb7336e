"""Shared fixtures: tiny weights and inputs made once per session, and an mpiexec runner.

MPI tests start real ranks with ``mpiexec`` as a subprocess, always under a timeout, so a hang
fails the test instead of the CI job.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
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


def rank_env(**extra) -> dict:
    """The environment of test ranks: one BLAS thread each (ranks share 2 cores in CI)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1", **extra)


def moe_hpc_cmd(*args, ranks: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "moe_hpc.cli", *map(str, args)]
    return cmd if ranks is None else [MPIEXEC, "-n", str(ranks), *cmd]


def moe_hpc(*args, ranks: int | None = None, timeout: float = MPI_TIMEOUT, cwd=None) -> Result:
    """Run ``moe-hpc ARGS`` as one process, or under ``mpiexec -n ranks``."""
    proc = subprocess.run(moe_hpc_cmd(*args, ranks=ranks), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=rank_env())
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------- runs that get interrupted

def progress_record(output: Path) -> dict | None:
    try:
        return json.loads(output.with_name(output.name + ".progress.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for_chunks(output: Path, chunks: int, proc=None, timeout: float = 60) -> int:
    """Poll the progress record until ``chunks`` chunks are recorded; returns how many are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = progress_record(output)
        if record and record["chunks_done"] >= chunks:
            return record["chunks_done"]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {chunks} chunks were recorded")
        time.sleep(0.01)
    raise AssertionError(f"{output}: fewer than {chunks} chunks recorded after {timeout} s")


def rank_pids(tag: str) -> dict[int, int]:
    """{MPI rank: pid} of the moe-hpc ranks started with MOE_HPC_TEST_TAG=tag (from /proc).

    Ranks are the Python processes with the tag in their environment (not the launchers).
    """
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"MOE_HPC_TEST_TAG") == tag.encode() and b"python" in Path(argv0.decode()).name.encode():
            rank = env.get(b"PMI_RANK") or env.get(b"SLURM_PROCID") or b"0"
            found[int(rank)] = int(entry.name)
    return found


def signal_ranks(pids, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


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


def _shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("mpich_*")}


@pytest.fixture
def no_stale_shm():
    """For tests that kill ranks: remove the MPICH shared-memory segments they leave behind.

    A killed rank never unlinks its node's segment; a later job whose id hashes to the same name
    would attach to the stale one and fail in MPI_Init. Only segments that appeared during the
    test and that no process still maps are removed.
    """
    before = _shm_segments()
    yield
    new = _shm_segments() - before
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped |= {line.rsplit("/", 1)[-1] for line in maps.read_text().splitlines() if "/dev/shm/mpich_" in line}
        except OSError:
            pass
    for name in new - mapped:
        (Path("/dev/shm") / name).unlink(missing_ok=True)


def signal_pending(pid: int, signum: int) -> bool:
    """Is ``signum`` pending for process ``pid`` (e.g. queued while it is stopped)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return True        # gone: nothing left to wait for


def signal_midway(tag: str, ranks: int, send, signum: int, timeout: float = 30) -> None:
    """Deliver ``signum`` to every rank mid-run, deterministically on any machine speed.

    Freeze the ranks (SIGSTOP), call ``send()`` (which signals a launcher or the batch script),
    wait until the launcher has passed the signal on to every rank, then let them go on: they
    see it at their next chunk boundary, with chunks left to do.
    """
    import signal
    deadline = time.monotonic() + timeout
    while len(pids := rank_pids(tag)) < ranks:
        assert time.monotonic() < deadline, f"found ranks {pids}, expected {ranks}"
        time.sleep(0.05)
    signal_ranks(pids.values(), signal.SIGSTOP)
    try:
        # A signal sent before a rank has really stopped could be handled at once, not queued.
        while not all(stopped(pid) for pid in pids.values()):
            assert time.monotonic() < deadline, "the ranks did not stop"
            time.sleep(0.01)
        send()
        while not all(signal_pending(pid, signum) for pid in pids.values()):
            assert time.monotonic() < deadline, "the launcher did not pass the signal on to every rank"
            time.sleep(0.02)
    finally:
        signal_ranks(pids.values(), signal.SIGCONT)
