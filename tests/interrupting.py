"""Stopping, signalling and killing the ranks of a running job from a test, deterministically.

The ranks are found through /proc by a tag in their environment (``MOE_HPC_TEST_TAG``, passed
on by mpiexec, sbatch and srun alike) and frozen with SIGSTOP while the test acts, so the run
can never finish first, however fast the machine.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


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
        if env.get(b"MOE_HPC_TEST_TAG") == tag.encode() and "python" in Path(argv0.decode()).name:
            rank = env.get(b"PMI_RANK") or env.get(b"SLURM_PROCID") or b"0"
            found[int(rank)] = int(entry.name)
    return found


def signal_ranks(pids, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("mpich_*")}


def remove_stale_shm(before: set[str]) -> None:
    """Remove the MPICH shared-memory segments that appeared since ``before`` and that no
    process maps any more: a killed rank never unlinks its node's segment, and a later job whose
    id hashes to the same name would attach to the stale one and fail in MPI_Init."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped |= {line.rsplit("/", 1)[-1] for line in maps.read_text().splitlines() if "/dev/shm/mpich_" in line}
        except OSError:
            pass
    for name in shm_segments() - before - mapped:
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


def freeze_ranks(tag: str, ranks: int, timeout: float = 30) -> dict[int, int]:
    """Find the ``ranks`` ranks tagged ``tag`` and stop them (SIGSTOP); returns {rank: pid}.

    Waits until they really are stopped: a signal sent before that could be handled at once.
    """
    deadline = time.monotonic() + timeout
    while len(pids := rank_pids(tag)) < ranks:
        assert time.monotonic() < deadline, f"found ranks {pids}, expected {ranks}"
        time.sleep(0.05)
    signal_ranks(pids.values(), signal.SIGSTOP)
    while not all(stopped(pid) for pid in pids.values()):
        assert time.monotonic() < deadline, "the ranks did not stop"
        time.sleep(0.01)
    return pids


def signal_midway(tag: str, ranks: int, send, signum: int, timeout: float = 30) -> None:
    """Deliver ``signum`` to every rank mid-run, deterministically on any machine speed.

    Freeze the ranks, call ``send()`` (which signals a launcher or the batch script), wait until
    the launcher has passed the signal on to every rank, then let them go on: they see it at
    their next chunk boundary, with chunks left to do.
    """
    pids = freeze_ranks(tag, ranks, timeout)
    deadline = time.monotonic() + timeout
    try:
        send()
        while not all(signal_pending(pid, signum) for pid in pids.values()):
            assert time.monotonic() < deadline, "the launcher did not pass the signal on to every rank"
            time.sleep(0.02)
    finally:
        signal_ranks(pids.values(), signal.SIGCONT)


def kill_rank_midway(tag: str, ranks: int, victim: int = 1) -> float:
    """SIGKILL rank ``victim`` mid-run (the others frozen meanwhile, so the run cannot end
    first), let the others go on; returns the monotonic time of the kill."""
    pids = freeze_ranks(tag, ranks)
    t0 = time.monotonic()
    signal_ranks([pids[victim]], signal.SIGKILL)
    signal_ranks([pid for rank, pid in pids.items() if rank != victim], signal.SIGCONT)
    return t0
