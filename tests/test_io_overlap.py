"""A run's file I/O overlaps its compute (runtime/io_worker.py, runtime/runner.py: _RankChunks):
chunk c+1 is read before chunk c's write has finished, yet the progress record never claims a
chunk before every writer has written and synced it. A write that fails mid-run keeps exactly
the chunks before it, and the rerun resumes them to the uninterrupted output.

The ranks run ``moe-hpc`` with the input's reads, the output's writes and syncs and rank 0's
progress records logged (monotonic clock, one log per rank); one rank's write of its third chunk
fails as on a full disk."""
from __future__ import annotations

import pytest

from helpers import MPIEXEC, assert_same_output, moe_hpc, progress_record, run_args

LOGGED = """
import errno, os, sys, time
from mpi4py import MPI
from moe_hpc.files import batches
from moe_hpc.runtime import runner
rank, fail_rank = MPI.COMM_WORLD.Get_rank(), int(os.environ["FAIL_RANK"])
log = open(os.environ["IO_LOG"] + f".{rank}", "a", buffering=1)
def note(event, value):
    log.write(f"{time.monotonic()} {event} {value}\\n")
real_read, real_write, real_sync, real_save = (batches.InputBatch.read_chunk, batches.OutputWriter.write_hidden,
                                               batches.OutputWriter.sync, runner.save_progress)
def read_chunk(self, s0, s1, *args):
    if s1 - s0 == 1:                  # a chunk's read (the checks before the run read blocks)
        note("read", s0)
    return real_read(self, s0, s1, *args)
writes = []
def write_hidden(self, s0, hidden):
    writes.append(s0)
    time.sleep(0.05)                  # a slow disk
    if rank == fail_rank and len(writes) == 3 and os.environ.get("FAIL") == "1":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_write(self, s0, hidden)
def sync(self):
    real_sync(self)
    note("synced", writes[-1])
def save_progress(output, progress):
    real_save(output, progress)
    note("recorded", progress.chunks_done)
batches.InputBatch.read_chunk, batches.OutputWriter.write_hidden, batches.OutputWriter.sync = read_chunk, write_hidden, sync
runner.save_progress = save_progress
from moe_hpc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _events(log, ranks: int) -> list[dict]:
    """Per rank: {(event, value): monotonic time} of its log."""
    out = []
    for rank in range(ranks):
        lines = (line.split() for line in log.with_name(f"{log.name}.{rank}").read_text().splitlines())
        out.append({(event, int(value)): float(t) for t, event, value in lines})
    return out


# (ranks under mpiexec or one process, the rank whose third write fails, its first sequence)
CASES = [pytest.param(None, 0, 0, id="one-process"),
         pytest.param(2, 1, 3, id="two-ranks", marks=pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec"))]


@pytest.mark.parametrize("ranks, fail_rank, first", CASES)
def test_read_ahead_and_write_behind_keep_the_record_true(ranks, fail_rank, first, tiny_files, tmp_path):
    out, log = tmp_path / "out.h5", tmp_path / "io.log"
    args = run_args(tiny_files[0], tiny_files[1], out)       # 6 sequences, one a chunk
    ranks_run = ranks or 1
    chunks = 6 // ranks_run

    failed = moe_hpc(*args, ranks=ranks, program=LOGGED, IO_LOG=str(log), FAIL_RANK=str(fail_rank), FAIL="1")
    errors = failed.error_lines
    assert failed.returncode != 0 and len(errors) == 1, failed.stderr
    assert f"{out}.tmp: cannot write sequences {first + 2}.." in errors[0], failed.stderr
    assert f"2 of {chunks} chunks are finished and kept" in errors[0], failed.stderr
    assert progress_record(out)["chunks_done"] == 2

    events = _events(log, ranks_run)
    for rank, ev in enumerate(events):
        lo = rank * chunks
        for c in range(2):          # chunk c+1's read starts before chunk c's write is synced
            assert ev[("read", lo + c + 1)] < ev[("synced", lo + c)], (rank, c, ev)
    for (event, done), at in events[0].items():     # rank 0's records, each after every writer's sync
        if event == "recorded" and done:
            for rank, ev in enumerate(events):
                assert ev[("synced", rank * chunks + done - 1)] < at, (rank, done, events)
    assert ("recorded", 3) not in events[0]

    rerun = moe_hpc(*args, ranks=ranks)
    assert rerun.returncode == 0 and f"resuming at chunk 3 of {chunks}" in rerun.stderr, rerun.stderr
    whole = tmp_path / "whole.h5"
    assert moe_hpc(*run_args(tiny_files[0], tiny_files[1], whole), ranks=ranks).returncode == 0
    assert_same_output(out, whole, tmp_path)
