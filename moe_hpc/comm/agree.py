"""Small agreement collectives: every rank calls them with one number and all get the same answer.

They are how ranks agree without exchanging data: the micro-batch count of an exchange step (the
busiest rank's), the stop signal at a chunk boundary, the slowest rank's time.  Here, so that
no module above ``comm/`` reaches for mpi4py.
"""
from __future__ import annotations


def _mpi():
    from mpi4py import MPI
    return MPI


def agree_max(comm, value):
    """Collective over ``comm``: the largest ``value`` of any rank."""
    return comm.allreduce(value, op=_mpi().MAX)


def agree_min(comm, value):
    """Collective over ``comm``: the smallest ``value`` of any rank."""
    return comm.allreduce(value, op=_mpi().MIN)


def host_name() -> str:
    """This rank's processor name, as MPI reports it (the dry run's layout table)."""
    return _mpi().Get_processor_name()


__all__ = ["agree_max", "agree_min", "host_name"]
