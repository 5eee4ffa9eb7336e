"""A one-node Slurm cluster on this machine, for the job-script tests.

Debian 12 as root with no systemd (CI): Debian's packages are installed when missing
(``apt-get``, root only; ``MOE_HPC_SLURM_INSTALL=0`` forbids it), then munged, slurmctld and
slurmd are started by hand in the foreground, as children of the test process, with the
minimal config ``tests/slurm/slurm.conf.in`` (free ports, every file under one temporary
directory), and stopped by their PIDs at the end.  Anything that keeps Slurm from running here
raises ``SlurmUnavailable`` with the reason, which the tests turn into a skip (or a failure in
CI, where Slurm must run).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CONF_TEMPLATE = Path(__file__).parent / "slurm" / "slurm.conf.in"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")
SBIN = "/usr/sbin:/sbin"


class SlurmUnavailable(Exception):
    """Why Slurm cannot run here (the skip reason)."""


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":" + SBIN)


def ensure_installed() -> None:
    """Install Debian's Slurm and munge if a program is missing (root with apt-get only)."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if not missing:
        return
    why = f"Slurm programs missing ({', '.join(missing)})"
    if os.environ.get("MOE_HPC_SLURM_INSTALL") == "0":
        raise SlurmUnavailable(f"{why} and MOE_HPC_SLURM_INSTALL=0 forbids installing them")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{why}; installing them needs root and apt-get "
                               f"(apt-get install {' '.join(PACKAGES)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {(proc.stdout + proc.stderr)[-800:]}")
    still = [p for p in PROGRAMS if _which(p) is None]
    if still:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(still)} still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(root: Path) -> Path:
    """Fill the template for this machine; returns the slurm.conf path."""
    values = {"host": socket.gethostname().split(".")[0], "ctld_port": _free_port(),
              "slurmd_port": _free_port(), "munge_socket": root / "munge.sock", "root": root,
              "cpus": os.cpu_count() or 1, "first_job_id": random.randrange(1000, 60_000_000)}
    text = re.sub(r"@([a-z_]+)@", lambda m: str(values[m.group(1)]), CONF_TEMPLATE.read_text())
    conf = root / "slurm.conf"
    conf.write_text(text)
    return conf


@dataclass
class Cluster:
    root: Path
    env: dict                        # SLURM_CONF and PATH for the client commands
    host: str
    daemons: list = field(default_factory=list)   # Popen of munged, slurmctld, slurmd

    def run(self, *cmd, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))}: {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args, env: dict | None = None, cwd=None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], capture_output=True,
                              text=True, env={**self.env, **(env or {})}, cwd=cwd, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """scontrol's view of one job: JobState, Restarts, ExitCode, ... as strings."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: int, until, timeout: float) -> dict:
        """Poll until ``until(job_dict)`` holds; raises TimeoutError with the job's state."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(0.2)

    def wait_steps_gone(self, job_id: int, timeout: float = 60) -> None:
        """Wait until no slurmstepd of ``job_id`` is left (their titles read "slurmstepd: [id.step]").

        A requeued job reuses its id and step numbers; a step daemon of the previous run that
        exits late removes the new step's socket of the same name (srun then fails with
        "mpi/pmi2: failed to send temp kvs"). Slurm's own requeue delay (~2 minutes) hides this.
        """
        prefix = f"slurmstepd: [{job_id}.".encode()
        deadline = time.monotonic() + timeout
        while any(prefix in cmd for cmd in _cmdlines()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: step daemons still running after {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        """Cancel what is left, then stop our daemons by PID (newest first)."""
        try:
            self.run("scancel", "--full", "-u", "root", check=False, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _cmdlines():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield (entry / "cmdline").read_bytes()
            except OSError:
                pass


def _start(cluster: Cluster, name: str, cmd: list) -> None:
    log = open(cluster.root / f"{name}.out", "w")
    cluster.daemons.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cluster.env,
                                            start_new_session=True))


def _wait_for(cluster: Cluster, what: str, ready, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in cluster.daemons if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "".join((cluster.root / f).read_text()[-600:] for f in
                           ("munged.out", "slurmctld.out", "slurmd.out") if (cluster.root / f).exists())
            raise SlurmUnavailable(f"{what} did not come up ({'exited: ' + ', '.join(dead) if dead else 'timeout'}):\n{logs}")
        time.sleep(0.2)


def start_cluster() -> Cluster:
    """Install if needed, configure and start the daemons, wait for an idle node.

    Everything lives in a fresh directory under /tmp, world-searchable as munged demands of
    its socket's directories (pytest's temporary directories are private), removed by stop().
    """
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd with SlurmUser=root needs root")
    root = Path(tempfile.mkdtemp(prefix="moe_hpc_slurm_"))
    root.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    conf = write_config(root)
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=os.environ.get("PATH", "") + ":" + SBIN)
    cluster = Cluster(root, env, socket.gethostname().split(".")[0])
    try:
        _start(cluster, "munged", ["munged", "-F", f"--socket={root / 'munge.sock'}", f"--key-file={key}",
                                   f"--log-file={root / 'munged.log'}", f"--pid-file={root / 'munged.pid'}",
                                   f"--seed-file={root / 'munged.seed'}"])
        _wait_for(cluster, "munged", (root / "munge.sock").exists)
        _start(cluster, "slurmctld", ["slurmctld", "-D", "-f", conf])
        _start(cluster, "slurmd", ["slurmd", "-D", "-f", conf, "-N", cluster.host])
        idle = lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout
        _wait_for(cluster, "the Slurm node", idle)
    except BaseException:
        cluster.stop()
        raise
    return cluster


__all__ = ["Cluster", "SlurmUnavailable", "start_cluster", "ensure_installed"]
