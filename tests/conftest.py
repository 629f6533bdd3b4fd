"""Shared fixtures: float64, seeding, MPI-safe temporary folders, teardown barrier.

The same suite runs serially and under ``mpiexec -n 2 python -m pytest``; ranks
other than 0 keep their terminal output quiet (their exit status still counts).
"""

import nngf_fem  # noqa: F401  (loads dolfinx_solver before dolfinx)

import gc
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
import torch
from mpi4py import MPI

torch.set_default_dtype(torch.float64)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if MPI.COMM_WORLD.rank > 0:  # rank 0 reports; the others stay quiet
        import os
        import sys

        sys.stdout = open(os.devnull, "w")  # noqa: SIM115


def pytest_collection_modifyitems(config, items):
    if MPI.COMM_WORLD.size > 1:
        skip = pytest.mark.skip(reason="serial-only test (skip_in_parallel)")
        for item in items:
            if "skip_in_parallel" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_teardown():
    torch.manual_seed(1234)
    np.random.seed(1234)  # noqa: NPY002 - seeds legacy global RNG users
    yield
    gc.collect()
    MPI.COMM_WORLD.Barrier()


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@pytest.fixture
def tempdir(request):
    """A folder shared by all ranks (made on rank 0, path broadcast), removed afterwards."""
    comm = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix=f"nngf_{request.node.name[:40]}_") if comm.rank == 0 else None
    path = comm.bcast(path, root=0)
    yield pathlib.Path(path)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
