"""Checkpoint and resume on real MPI ranks: a signal stops a run at a chunk boundary with exit
75 and its progress recorded; the rerun skips the recorded chunks and ends with an output equal
bit for bit to an uninterrupted run's (the wall-time attribute aside); a rerun with another
layout is refused and leaves the partial output alone; ``--restart`` discards it; a dry run
reports all this and writes nothing. Plus the progress record's rules without MPI."""
from __future__ import annotations

import json
import signal
import subprocess
import uuid

import h5py
import numpy as np
import pytest

from moe_hpc.config.errors import ResumeError
from moe_hpc.config.roles import role_layout
from moe_hpc.config.run_config import build_config
from moe_hpc.runtime.resume import Progress, check_partial, fingerprint, save_progress

from helpers import (assert_same_output, moe_hpc, needs_mpiexec, progress_record, run_args, signal_midway,
                     start_tagged, wait_for_chunks)


def interrupt(args, ranks: int, output, signum) -> subprocess.CompletedProcess:
    """Start ``moe-hpc ARGS`` under mpiexec, signal mpiexec after 2 chunks; returns the result."""
    tag = uuid.uuid4().hex
    proc = start_tagged(*args, ranks=ranks, tag=tag)
    try:
        wait_for_chunks(output, 2, proc)
        signal_midway(tag, ranks, lambda: proc.send_signal(signum), signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@needs_mpiexec
@pytest.mark.parametrize("signum, ranks, sets", [
    (signal.SIGUSR1, 2, ()),
    (signal.SIGTERM, 3, ("--set", "parallel.dense_ranks=1")),
    (signal.SIGTERM, 4, ("--set", "parallel.dense_ranks=2", "--set", "parallel.dense_tp=2")),
    (signal.SIGUSR1, 4, ("--set", "parallel.dense_stages=2", "--set", "run.pipeline_waves=2",
                         "--set", "run.chunk_sequences=2")),     # a wave holds at least one sequence
    (signal.SIGTERM, 4, ("--set", "parallel.dense_tp=2", "--set", "parallel.dense_stages=2")),
    (signal.SIGTERM, 4, ("--set", "parallel.dense_ranks=2", "--set", "parallel.dense_stages=2",
                         "--set", "parallel.expert_tp=2")),
    (signal.SIGUSR1, 6, ("--set", "parallel.dense_stages=3", "--set", "parallel.dp=2")),
], ids=["usr1-colocated", "term-dedicated-dense", "term-dense-tp", "usr1-dense-stages", "term-tp-x-stages",
        "term-stages-expert-tp", "usr1-stages3-dp2"])
def test_signal_stops_then_resume_is_bit_identical(signum, ranks, sets, tiny_files, long_input,
                                                   uninterrupted, tmp_path):
    out = tmp_path / "out.h5"
    args = run_args(tiny_files[0], long_input, out, *sets)
    first = interrupt(args, ranks, out, signum)
    assert first.returncode == 75, first.stderr
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in first.stderr and "error:" not in first.stderr, first.stderr
    assert first.stderr.count("stopped by") == 1, "the stop message should come from rank 0 only"
    record = progress_record(out)
    assert 2 <= record["chunks_done"] < record["chunks_total"], record
    assert not out.exists() and out.with_name("out.h5.tmp").exists()

    second = moe_hpc(*args, "--progress", "lines", "--progress-every", "0", ranks=ranks)
    assert second.returncode == 0, second.stderr
    assert f"resuming at chunk {record['chunks_done'] + 1} of {record['chunks_total']}" in second.stderr
    summary = json.loads(second.stdout)["summary"]
    assert summary["resumed_at_chunk"] == record["chunks_done"]
    assert summary["tokens_this_run"] < summary["tokens"]
    assert_same_output(out, uninterrupted(ranks, sets), tmp_path)
    assert not out.with_name("out.h5.tmp").exists() and progress_record(out) is None


@needs_mpiexec
def test_other_layout_is_refused_and_restart_discards(tiny_files, long_input, uninterrupted, tmp_path):
    out = tmp_path / "out.h5"
    args = run_args(tiny_files[0], long_input, out)
    assert interrupt(args, 2, out, signal.SIGUSR1).returncode == 75
    tmp, record = out.with_name("out.h5.tmp"), out.with_name("out.h5.progress.json")
    before = (tmp.read_bytes(), record.read_bytes())

    refused = moe_hpc(*args, ranks=3)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 1 and len(errors) == 1, refused.stderr
    assert str(record) in errors[0] and "rank layout" in errors[0] and "--restart" in errors[0]
    assert (tmp.read_bytes(), record.read_bytes()) == before, "a refused resume changed the partial output"

    other_config = moe_hpc(*args, "--set", "run.micro_batch_tokens=7", ranks=2)
    assert other_config.returncode == 1 and "config" in other_config.stderr
    assert (tmp.read_bytes(), record.read_bytes()) == before

    restarted = moe_hpc(*args, "--restart", ranks=3)
    assert restarted.returncode == 0, restarted.stderr
    assert json.loads(restarted.stdout)["summary"]["resumed_at_chunk"] == 0
    assert_same_output(out, uninterrupted(3), tmp_path)
    assert not tmp.exists() and not record.exists()


@needs_mpiexec
def test_dry_run_reports_and_writes_nothing(tiny_files, long_input, tmp_path):
    out = tmp_path / "out.h5"
    args = run_args(tiny_files[0], long_input, out, "--dry-run", "--set", "parallel.dense_ranks=1")
    r = moe_hpc(*args, ranks=3)
    assert r.returncode == 0, r.stderr
    assert "a fresh run" in r.stdout and "dry run: OK" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[4] for row in rows] == ["expert", "expert", "dense"], r.stdout
    assert rows[2][-2:] == ["[0,", "40)"], r.stdout            # the one dense rank owns them all
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a dry run wrote files"

    assert interrupt(run_args(tiny_files[0], long_input, out), 2, out, signal.SIGUSR1).returncode == 75
    done = progress_record(out)["chunks_done"]
    r = moe_hpc(*run_args(tiny_files[0], long_input, out, "--dry-run"), ranks=2)
    assert r.returncode == 0 and f"resume at chunk {done + 1} of 20" in r.stdout, r.stdout + r.stderr
    r = moe_hpc(*run_args(tiny_files[0], long_input, out, "--dry-run"), ranks=3)
    assert r.returncode == 1 and "rank layout" in r.stderr


@needs_mpiexec
def test_progress_lines_and_summary(tiny_files, long_input, tmp_path, tiny_cfg):
    out, summary_file = tmp_path / "out.h5", tmp_path / "summary.json"
    r = moe_hpc(*run_args(tiny_files[0], long_input, out, "--progress", "lines", "--progress-every", "0",
                          "--summary", summary_file), ranks=2)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("progress: chunk")]
    assert len(lines) == 20 and lines[-1].startswith("progress: chunk 20/20 (100.0%)"), r.stderr
    assert all("tokens/s" in line and "ETA" in line for line in lines)
    summary = json.loads(summary_file.read_text())["summary"]
    assert summary == json.loads(r.stdout)["summary"]
    with h5py.File(long_input, "r") as f:
        lengths = f["lengths"][()]
    m = tiny_cfg.model
    assert summary["tokens"] == lengths.sum() and summary["tokens_per_s"] > 0
    assert summary["expert_load"]["tokens_routed"] == lengths.sum() * m.top_k * m.num_moe_layers
    assert {"attention", "gating", "exchange", "experts", "io"} <= set(summary["phases_s"])


# ---------------------------------------------------------------- the record's rules (no MPI)

def test_check_partial_rules(tmp_path, tiny_files):
    weights, inputs = tiny_files
    cfg, output = build_config({}), tmp_path / "out.h5"
    fp = fingerprint(cfg, weights, inputs, role_layout(2, 0))
    assert check_partial(output, fp, 5, restart=False) is None           # nothing there
    output.with_name("out.h5.tmp").write_bytes(b"partial")
    assert check_partial(output, fp, 5, restart=False) is None           # no record: start afresh
    save_progress(output, Progress(fp, 5, 3, np.ones((3, 8), np.int64)))
    progress = check_partial(output, fp, 5, restart=False)
    assert progress.chunks_done == 3 and progress.expert_tokens.sum() == 24
    assert check_partial(output, fp, 5, restart=True) is None
    cases = {"rank layout": fingerprint(cfg, weights, inputs, role_layout(3, 1)),
             "config": fingerprint(build_config({}, ["run.chunk_sequences=2"]), weights, inputs, role_layout(2, 0)),
             "input file": fingerprint(cfg, weights, weights, role_layout(2, 0))}
    for words, other in cases.items():
        with pytest.raises(ResumeError, match=words):
            check_partial(output, other, 5, restart=False)
    with pytest.raises(ResumeError, match="chunk count"):
        check_partial(output, fp, 6, restart=False)
    output.with_name("out.h5.progress.json").write_text("{not json")
    with pytest.raises(ResumeError, match="unreadable progress record"):
        check_partial(output, fp, 5, restart=False)
