"""The job scripts under a real Slurm: a one-node cluster on this machine (slurm_cluster.py).

- the CPU variant of jobs/moe_infer.sbatch, launched by srun and by mpiexec, writes the same
  output, bit for bit, as a direct mpiexec run of the same layout;
- ``scancel --signal=USR1 --batch`` mid-run: the script's trap passes the signal on, the ranks
  stop at a chunk boundary (exit 75), the script requeues the job, and the requeued job resumes
  to an output equal to an uninterrupted run's;
- a rank killed under srun ends the job (FAILED) within the bound, the recorded chunks kept;
- srun without a PMI plugin is refused instead of running the job twice;
- jobs/moe_plan.sbatch prints the layout and writes nothing;
- jobs/scaling_study.sh submits its points and a report job that writes the table and plot.

Skipped, with the reason, where Slurm cannot run (not root and not installed); in CI (``CI``
set) that is a failure instead, since these tests must run there.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import (REPO, TINY, assert_same_output, kill_rank_midway, needs_mpiexec, progress_record,
                     signal_midway, wait_for_chunks)
from slurm_cluster import SlurmUnavailable, start_cluster

pytestmark = needs_mpiexec

JOB_TIMEOUT = 120
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
KILL_BOUND_S = 15.0     # srun ends the step at once; Slurm SIGKILLs what is left after KillWait (5 s here)


@pytest.fixture(scope="module")
def slurm():
    venv_moe = Path(sys.prefix) / "bin" / "moe-hpc"
    if not venv_moe.exists():
        pytest.skip(f"the job scripts need a virtualenv with moe-hpc ({venv_moe} is missing)")
    try:
        cluster = start_cluster()
    except SlurmUnavailable as exc:
        message = f"Slurm cannot run here: {exc}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    yield cluster
    cluster.stop()


def job_env(weights, inputs, output, **extra) -> dict:
    """The knobs of jobs/moe_infer.sbatch for the long test input, one sequence per chunk."""
    return {"MOE_HPC_ROOT": str(REPO), "VENV": sys.prefix, "WEIGHTS": str(weights), "INPUT": str(inputs),
            "OUTPUT": str(output), "SETS": "--set run.chunk_sequences=1", "PYTHONUNBUFFERED": "1",
            "RUN_ARGS": "--progress lines --progress-every 0", **extra}


def submit(slurm, script: str, log: Path, env: dict, *sbatch_args) -> int:
    return slurm.sbatch("--output", log, *sbatch_args, REPO / "jobs" / script, env=env, cwd=REPO)


def ended(info: dict) -> bool:
    return info["JobState"] in ENDED


@pytest.mark.parametrize("launcher, launch_line", [("srun", "launch: srun --mpi=pmi2 --kill-on-bad-exit=1 "),
                                                   ("mpiexec", "/bin/mpiexec -n 2 ")])
def test_cpu_job_matches_direct_run(slurm, launcher, launch_line, tiny_files, long_input, uninterrupted,
                                    tmp_path):
    out, log = tmp_path / "out.h5", tmp_path / "job.log"
    job = submit(slurm, "moe_infer_cpu.sbatch", log, job_env(tiny_files[0], long_input, out, LAUNCHER=launcher))
    info = slurm.wait(job, ended, JOB_TIMEOUT)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert launch_line in text and "progress: chunk 20/20 (100.0%)" in text and '"summary"' in text
    assert_same_output(out, uninterrupted(2), tmp_path)


def stop_requeue_and_finish(slurm, job: int, tag: str, out: Path, log: Path) -> tuple[dict, str]:
    """Once 2 chunks are recorded, USR1 to the batch script (every rank seeing it mid-run); the
    job must come back requeued (PENDING), then run to COMPLETED. -> (the progress record at
    the stop, the job log)."""
    wait_for_chunks(out, 2)
    signal_midway(tag, 2, lambda: slurm.run("scancel", "--signal=USR1", "--batch", job), signal.SIGUSR1)
    # Slurm holds a requeued batch job for about two minutes (BeginTime); start it now instead.
    info = slurm.wait(job, lambda i: int(i.get("Restarts", 0)) >= 1 and i["JobState"] == "PENDING"
                      or ended(i), JOB_TIMEOUT)
    assert info["JobState"] == "PENDING", log.read_text()
    record = progress_record(out)
    slurm.wait_steps_gone(job)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm.wait(job, ended, JOB_TIMEOUT)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    return record, text


def test_usr1_requeue_resume_matches_uninterrupted(slurm, tiny_files, long_input, uninterrupted, tmp_path):
    out, log, tag = tmp_path / "out.h5", tmp_path / "job.log", uuid.uuid4().hex
    job = submit(slurm, "moe_infer_cpu.sbatch", log,
                 job_env(tiny_files[0], long_input, out, MOE_HPC_TEST_TAG=tag))
    record, text = stop_requeue_and_finish(slurm, job, tag, out, log)
    stopped_at = record["chunks_done"]
    assert 2 <= stopped_at < 20
    for needle in ("stop signal: ranks finish the current chunk", "stopped by SIGUSR1", "moe-hpc exit status 75",
                   f"requeueing job {job}", "(restart count 1)", f"resuming at chunk {stopped_at + 1} of 20",
                   "moe-hpc exit status 0"):
        assert needle in text, f"{needle!r} not in the job log:\n{text}"
    assert_same_output(out, uninterrupted(2), tmp_path)
    assert progress_record(out) is None and not out.with_name("out.h5.tmp").exists()


def test_text_prompt_job_is_requeued_and_resumes(slurm, tmp_path):
    """jobs/moe_generate.sbatch's knobs with PROMPTS (text, an HF directory's tokenizer.json),
    through the CPU script: stopped by USR1 mid-run, requeued, resumed; its completions (.jsonl)
    and tokens equal a direct one-process run's."""
    import json
    import shutil
    from helpers import build_tokenizer, fixture, moe_hpc, read_generated
    from moe_hpc.config.run_config import load_config
    folder = tmp_path / "hf_mixtral"
    shutil.copytree(fixture("mixtral"), folder)
    build_tokenizer(folder, size=load_config(folder).model.vocab_size)
    prompts = tmp_path / "prompts.jsonl"
    words = ["hello world", "the cat sat on the mat", "cat", "the caf\u00e9"]
    prompts.write_text("".join(json.dumps({"prompt": words[i % 4]}) + "\n" for i in range(40)))
    sets, gen = "--set run.chunk_sequences=1", "--max-new-tokens 6"
    direct = tmp_path / "direct.h5"
    r = moe_hpc("generate", folder, "--weights", folder, "--prompts", prompts, "--output", direct,
                *sets.split(), *gen.split(), "--progress", "off")
    assert r.returncode == 0, r.stderr
    out, log, tag = tmp_path / "out.h5", tmp_path / "job.log", uuid.uuid4().hex
    env = job_env(folder, "", out, VERB="generate", CONFIG=str(folder), PROMPTS=str(prompts), SETS=sets,
                  RUN_ARGS=gen + " --progress lines --progress-every 0", MOE_HPC_TEST_TAG=tag)
    del env["INPUT"]
    job = submit(slurm, "moe_infer_cpu.sbatch", log, env)
    record, text = stop_requeue_and_finish(slurm, job, tag, out, log)
    stopped_at, groups = record["chunks_done"], record["chunks_total"]
    assert 2 <= stopped_at < groups == 20, record         # 40 prompts, 2 dense ranks, 1 a group
    for needle in ("moe-hpc exit status 75", f"requeueing job {job}", f"resuming at group {stopped_at + 1} of {groups}",
                   "moe-hpc exit status 0"):
        assert needle in text, f"{needle!r} not in the job log:\n{text}"
    assert out.with_suffix(".jsonl").read_text() == direct.with_suffix(".jsonl").read_text()
    got, want = read_generated(out), read_generated(direct)
    for name in ("generated", "generated_lengths", "finish_reason"):
        assert (got[name] == want[name]).all(), name


@pytest.mark.parametrize("knobs, message", [
    ({"VERB": "generate", "INPUT": "in.h5", "PROMPTS": "p.jsonl"}, "error: set INPUT or PROMPTS, not both"),
    ({"VERB": "run", "PROMPTS": "p.jsonl"}, "error: PROMPTS needs VERB=generate"),
    ({"VERB": "generate"}, "error: set INPUT (the input batch HDF5), or PROMPTS=prompts.jsonl with VERB=generate"),
], ids=["input-and-prompts", "prompts-for-run", "neither"])
def test_job_script_refuses_its_knobs_in_one_error_line(knobs, message, tmp_path):
    """Checked before anything starts (no Slurm needed): one error: line, exit 1, nothing written."""
    env = {"PATH": os.environ["PATH"], "MOE_HPC_ROOT": str(REPO), "WEIGHTS": "w.h5",
           "OUTPUT": str(tmp_path / "out.h5"), **knobs}
    r = subprocess.run(["bash", str(REPO / "jobs" / "moe_infer.sbatch")], env=env, capture_output=True,
                       text=True, timeout=30)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and errors[0].startswith(message), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_killed_rank_under_srun_ends_job(slurm, tiny_files, long_input, tmp_path, no_stale_shm):
    out, log, tag = tmp_path / "out.h5", tmp_path / "job.log", uuid.uuid4().hex
    job = submit(slurm, "moe_infer_cpu.sbatch", log,
                 job_env(tiny_files[0], long_input, out, MOE_HPC_TEST_TAG=tag))
    wait_for_chunks(out, 2)
    t0 = kill_rank_midway(tag, 2)
    info = slurm.wait(job, ended, JOB_TIMEOUT)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    print(f"killed rank under srun: job {info['JobState']} {elapsed:.2f} s later")
    assert info["JobState"] == "FAILED", text
    assert elapsed < KILL_BOUND_S, f"the job took {elapsed:.1f} s to end after a rank was killed\n{text}"
    assert "requeueing" not in text
    assert progress_record(out)["chunks_done"] >= 2 and out.with_name("out.h5.tmp").exists()


def test_srun_without_pmi_is_refused(slurm, tiny_files, tmp_path):
    """srun --mpi=none starts two one-rank worlds: each must refuse, not write the output twice."""
    out = tmp_path / "out.h5"
    r = slurm.run("srun", "-n", "2", "--mpi=none", Path(sys.prefix) / "bin" / "moe-hpc", "run", TINY,
                  "--weights", tiny_files[0], "--input", tiny_files[1], "--output", out, check=False, timeout=60)
    assert r.returncode != 0 and r.stderr.count("error: srun started 2 tasks but MPI sees 1 rank") == 2, r.stderr
    assert not out.exists() and not out.with_name("out.h5.tmp").exists()


def test_plan_job_prints_layout(slurm, tiny_files, long_input, tmp_path):
    out, log = tmp_path / "out.h5", tmp_path / "plan.log"
    env = job_env(tiny_files[0], long_input, out, DEVICE="cpu", RUN_ARGS="",
                  SETS="--set parallel.dense_ranks=1")
    job = submit(slurm, "moe_plan.sbatch", log, env, "--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2")
    info = slurm.wait(job, ended, JOB_TIMEOUT)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "dry run: OK, nothing computed or written" in text and f"{slurm.host}" in text
    assert "1 dense, 1 expert" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.log"]


def test_scaling_study_submits_points_and_report(slurm, tmp_path):
    results = tmp_path / "study"
    env = {**slurm.env, "RESULTS": str(results), "NODES": "1", "RANKS_PER_NODE": "1 2", "DEVICE": "cpu",
           "SEQUENCES": "8", "SEQS_PER_RANK": "4", "SEQ_LEN": "16", "VENV": sys.prefix}
    proc = subprocess.run(["bash", "jobs/scaling_study.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1))
    info = slurm.wait(report, ended, JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED", (results / "report.log").read_text()
    rows = (results / "scaling.md").read_text().splitlines()[2:]
    assert [row.split("|")[1:4] for row in rows] == [
        [" strong ", " 1 ", " 1 "], [" strong ", " 1 ", " 2 "], [" weak ", " 1 ", " 1 "], [" weak ", " 1 ", " 2 "]]
    assert (results / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_job_matches_direct_generate(slurm, tmp_path):
    """VERB=generate runs ``moe-hpc generate`` through the same job script (jobs/moe_generate.sbatch
    sets it; the CPU script here, as the test cluster has no GPU): the job's tokens equal a
    direct one-process generate."""
    from moe_hpc.config.run_config import build_config
    from moe_hpc.tools.synth import write_checkpoint, write_inputs
    from helpers import moe_hpc, read_generated
    model = build_config({"model": {"vocab_size": 256}}).model
    weights, prompts = tmp_path / "w.h5", tmp_path / "prompts.h5"
    write_checkpoint(weights, model, seed=3)
    write_inputs(prompts, model, sequences=5, seq_len=12, seed=4, ragged=True)
    sets, gen = "--set model.vocab_size=256 --set run.chunk_sequences=2", "--max-new-tokens 4"
    direct = tmp_path / "direct.h5"
    r = moe_hpc("generate", TINY, "--weights", weights, "--input", prompts, "--output", direct, *sets.split(),
                *gen.split(), "--progress", "off")
    assert r.returncode == 0, r.stderr
    out, log = tmp_path / "out.h5", tmp_path / "job.log"
    env = job_env(weights, prompts, out, VERB="generate", SETS=sets, RUN_ARGS=gen + " --progress off")
    info = slurm.wait(submit(slurm, "moe_infer_cpu.sbatch", log, env), ended, JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()
    got, want = read_generated(out), read_generated(direct)
    for name in ("generated", "generated_lengths", "finish_reason"):
        assert (got[name] == want[name]).all(), name
