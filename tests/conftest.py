"""Shared fixtures: tiny weights and inputs made once per session, the float64 reference and
the single-process output every layout is held to, a long input and its uninterrupted outputs
(the resume tests' reference), and shared-memory cleanup for tests that kill ranks and for
the whole session.

Helpers that are not fixtures (the one launcher, the bad-input contract, interrupting ranks)
live in helpers.py.
"""
from __future__ import annotations

import h5py
import pytest

from moe_hpc.config.run_config import build_config
from moe_hpc.model.reference import read_output_hidden, reference_forward
from moe_hpc.tools.synth import write_checkpoint, write_inputs

from helpers import TINY, moe_hpc, remove_stale_shm, run_args, shm_segments


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


@pytest.fixture(scope="session")
def reference(tiny_files):
    """(float64 reference of the tiny files, their lengths)."""
    weights, inputs = tiny_files
    with h5py.File(inputs, "r") as f:
        lengths = f["lengths"][()]
    return reference_forward(weights, inputs), lengths


@pytest.fixture(scope="session")
def baseline(tiny_files, tmp_path_factory):
    """The single-process output (no mpiexec at all), the split every other run is held to."""
    weights, inputs = tiny_files
    out = tmp_path_factory.mktemp("base") / "out.h5"
    r = moe_hpc("run", TINY, "--weights", weights, "--input", inputs, "--output", out)
    assert r.returncode == 0, r.stderr
    return read_output_hidden(out)


# ---------------------------------------------------------------- a run long enough to interrupt

@pytest.fixture(scope="session")
def long_input(tmp_path_factory, tiny_cfg):
    """40 ragged sequences: 20 one-sequence chunks per dense rank on 2 dense ranks."""
    path = tmp_path_factory.mktemp("long") / "inputs.h5"
    write_inputs(path, tiny_cfg.model, sequences=40, seq_len=32, seed=7, ragged=True)
    return path


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


@pytest.fixture(scope="session", autouse=True)
def no_stale_shm_after_session():
    """Killed or aborted ranks (fault tests, internal-error tests) leave MPICH's shared-memory
    segments in /dev/shm; at the session's end remove those made during it that no process maps."""
    before = shm_segments()
    yield
    remove_stale_shm(before)


@pytest.fixture
def no_stale_shm():
    """For tests that kill ranks: clean the shared memory the killed ranks leave behind."""
    before = shm_segments()
    yield
    remove_stale_shm(before)
