"""A rank that dies or raises mid-run ends the whole job non-zero within FAULT_BOUND_S, never a
hang; the chunks recorded before the fault stay valid, and a rerun resumes them to an output
equal bit for bit to an uninterrupted run's.

Measured on 2 cores (docs/parallel.md): hydra's mpiexec ends the job about 0.05 s after a rank
is killed; a rank that raises aborts the job (MPI_Abort) in well under a second.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

from helpers import (assert_same_output, kill_rank_midway, moe_hpc, needs_mpiexec, progress_record, run_args,
                     start_tagged, wait_for_chunks)

pytestmark = needs_mpiexec

FAULT_BOUND_S = 10.0      # the documented bound; a hang would instead hit the subprocess timeout

# ``moe-hpc`` with a bug planted on rank 1: its fourth chunk raises, outside any collective step.
# (A chunk's write overlaps the next chunk's compute and is recorded after it: when chunk 3's
# compute raises, chunks 0 and 1 are recorded and chunk 2's write is the one in flight.)
RAISING = """
import sys
from mpi4py import MPI
from moe_hpc.runtime import engine
from moe_hpc.cli import main
calls = []
real = engine.Engine.forward_chunk
def forward_chunk(self, *args):
    calls.append(1)
    if MPI.COMM_WORLD.Get_rank() == 1 and len(calls) == 4:
        raise RuntimeError("planted fault")
    return real(self, *args)
engine.Engine.forward_chunk = forward_chunk
sys.exit(main(sys.argv[1:]))
"""


def _resume_matches(args, ranks, out, uninterrupted_out, scratch) -> None:
    record = progress_record(out)
    assert record and record["chunks_done"] >= 2, record
    rerun = moe_hpc(*args, ranks=ranks)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming at chunk {record['chunks_done'] + 1}" in rerun.stderr
    assert_same_output(out, uninterrupted_out, scratch)


def test_killed_rank_ends_job_within_bound(tiny_files, long_input, uninterrupted, tmp_path, no_stale_shm):
    out, tag = tmp_path / "out.h5", uuid.uuid4().hex
    args = run_args(tiny_files[0], long_input, out)
    proc = start_tagged(*args, ranks=2, tag=tag)
    try:
        wait_for_chunks(out, 2, proc)
        t0 = kill_rank_midway(tag, 2)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, err
    assert elapsed < FAULT_BOUND_S, f"the job took {elapsed:.1f} s to end after a rank was killed"
    print(f"killed rank: job ended {elapsed:.3f} s later, exit {proc.returncode}")
    _resume_matches(args, 2, out, uninterrupted(2), tmp_path)


def test_raising_rank_ends_job_within_bound(tiny_files, long_input, uninterrupted, tmp_path, no_stale_shm):
    out = tmp_path / "out.h5"
    args = run_args(tiny_files[0], long_input, out)
    r = moe_hpc(*args, ranks=2, program=RAISING, timeout=60)
    assert r.returncode != 0
    errors = r.error_lines
    assert len(errors) == 1 and "internal error on rank 1" in errors[0] and "planted fault" in errors[0], r.stderr
    assert r.wall_s < FAULT_BOUND_S + 5, f"the job took {r.wall_s:.1f} s (start-up included)"
    _resume_matches(args, 2, out, uninterrupted(2), tmp_path)


# An aborting rank whose stderr pipe nobody reads for a while: abort_job must hold the abort back
# until the line has been read (hydra loses it otherwise), and say how long it waited.
ABORT_AFTER_LINE = """
import sys, time
from moe_hpc.comm.failure import abort_job, unread_stderr_bytes
class Comm:
    def Abort(self, code):
        print(f"{time.monotonic() - t0:.3f} {code}", flush=True)
sys.stderr.write("error: planted\\n")
print(unread_stderr_bytes(), flush=True)
t0 = time.monotonic()
abort_job(Comm(), 3)
"""


def test_abort_waits_until_the_error_line_is_read():
    reader_lag_s = 0.5
    child = subprocess.Popen([sys.executable, "-c", ABORT_AFTER_LINE], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        unread = child.stdout.readline()
        time.sleep(reader_lag_s)
        assert child.stderr.readline() == "error: planted\n"
        waited, code = child.stdout.readline().split()
    finally:
        child.kill()
        child.wait()
    assert int(unread) == len("error: planted\n")
    assert code == "3" and float(waited) >= 0.8 * reader_lag_s, waited


def test_only_a_pipe_has_unread_output(tmp_path, monkeypatch):
    """On a file FIONREAD counts the bytes past the offset (another rank appending to one log):
    not output waiting for a reader, so no abort waits on it."""
    from moe_hpc.comm.failure import unread_stderr_bytes
    log = (tmp_path / "log").open("w+")
    log.write("x" * 100)
    log.flush()
    log.seek(0)
    monkeypatch.setattr(sys, "stderr", log)
    assert unread_stderr_bytes() == 0
    log.close()


# ---------------------------------------------------------------- what the test session leaves behind

pytest_plugins = ["pytester"]


def test_session_removes_the_shm_segments_left_during_it(pytester, monkeypatch):
    """A killed or aborted rank leaves its /dev/shm/mpich_shm_* segment (about 4 MB each); the
    session fixture in conftest.py removes those made during the session that no process maps.
    An inner session with this suite's conftest leaves one such segment and must clean it."""
    tests = Path(__file__).parent
    monkeypatch.setenv("PYTHONPATH", str(tests))
    pytester.makeconftest((tests / "conftest.py").read_text())
    segment = Path("/dev/shm") / f"mpich_shm_test{uuid.uuid4().hex[:8]}_0"
    pytester.makepyfile(f"""
        from pathlib import Path
        def test_leaves_a_segment():
            Path({str(segment)!r}).write_bytes(b"a killed rank's segment")
    """)
    try:
        result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        assert not segment.exists(), "the session left its stale MPICH segment in /dev/shm"
    finally:
        segment.unlink(missing_ok=True)
