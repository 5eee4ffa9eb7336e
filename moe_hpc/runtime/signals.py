"""Stopping on request: SIGTERM or SIGUSR1 stop a run at the next chunk boundary.

Slurm sends such a signal before a time limit (``#SBATCH --signal``) or on preemption, and the
launchers forward it to every rank (checked: hydra's mpiexec and srun forward both).  A handler
only notes the signal; at every chunk boundary all ranks agree on it with one ``allreduce``,
so they stop after the same chunk, with its bytes and the progress record on disk, and exit
with ``EXIT_INTERRUPTED`` (75, EX_TEMPFAIL): "try again", which the job scripts turn into
``scontrol requeue``.  SIGINT (Ctrl-C) is not caught: it stops at once, and the run resumes
from the last recorded chunk.
"""
from __future__ import annotations

import signal

from ..comm.agree import agree_max

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_INTERRUPTED = 75


class StopRequest:
    """The signal noted on this rank (0: none), and the agreement on it across ranks."""

    def __init__(self):
        self.signum = 0

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._note)
        return self

    def _note(self, signum, _frame) -> None:
        self.signum = signum

    def agreed(self, comm) -> int:
        """Collective: the signal any rank got (the highest number), or 0."""
        return agree_max(comm, self.signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


__all__ = ["StopRequest", "STOP_SIGNALS", "EXIT_INTERRUPTED", "signal_name"]
