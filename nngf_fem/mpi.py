"""MPI helpers: collective error checks and reductions.

Every check that may fail on some ranks only goes through :func:`raise_on_any`, so
that all ranks raise the same error together instead of deadlocking in the next
collective call.
"""

from collections.abc import Callable

import numpy as np
from mpi4py import MPI

__all__ = ["raise_on_any", "allreduce_sum", "is_root"]


def raise_on_any(
    comm: MPI.Comm, failed: bool, message: str = "", exc: Callable[[str], Exception] = ValueError
) -> None:
    """Raise ``exc`` on every rank if ``failed`` is true on at least one rank.

    Args:
        comm: communicator shared by all ranks that must agree.
        failed: whether this rank found a problem.
        message: this rank's description of the problem (used if it failed).
        exc: exception type to raise on all ranks.
    """
    msgs = comm.allgather(message if failed else None)
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        first = bad[0][1]
        if comm.size > 1:
            first = f"{first} (on rank(s) {', '.join(str(r) for r, _ in bad)})"
        raise exc(first)


def allreduce_sum(comm: MPI.Comm, a: np.ndarray) -> np.ndarray:
    """Sum a numpy array over all ranks (returns a new array on every rank)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    out = np.empty_like(a)
    comm.Allreduce(a, out, op=MPI.SUM)
    return out


def is_root(comm: MPI.Comm = MPI.COMM_WORLD) -> bool:
    """True on rank 0 of ``comm``."""
    return comm.rank == 0
