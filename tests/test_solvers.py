"""KrylovSolver: options by prefix, failures reported and recoverable."""

import nngf_fem as nf

import numpy as np
import pytest
from mpi4py import MPI
from petsc4py import PETSc


def diag_matrix(values):
    comm = MPI.COMM_WORLD
    n = len(values)
    A = PETSc.Mat().createAIJ(((PETSc.DECIDE, n), (PETSc.DECIDE, n)), nnz=1, comm=comm)
    r0, r1 = A.getOwnershipRange()
    for i in range(r0, r1):
        A.setValue(i, i, values[i])
    A.assemble()
    return A


def test_failed_factorization_is_reported_and_recoverable():
    A = diag_matrix(np.array([1.0, 0.0, 2.0, 3.0]))
    solver = nf.KrylovSolver(A, petsc_options_prefix="test_lu_",
                             defaults={"ksp_type": "preonly", "pc_type": "lu"})
    b, x = A.createVecs()
    b.set(1.0)
    with pytest.raises(nf.SolverError, match="DIVERGED_PC"):
        solver.solve(b, x)
    assert not solver.converged and solver.reason < 0
    r0, r1 = A.getOwnershipRange()
    if r0 <= 1 < r1:
        A.setValue(1, 1, 4.0)
    A.assemble()
    solver.ksp.setOperators(A)
    solver.solve(b, x)
    assert solver.converged
    np.testing.assert_allclose(x.array_r, 1.0 / np.array([1.0, 4.0, 2.0, 3.0])[r0:r1])
    # the options were removed from the database again
    assert not PETSc.Options().hasName("test_lu_ksp_type")
    for obj in (solver, A, b, x):
        obj.destroy()


def test_prefix_is_required():
    A = diag_matrix(np.ones(2))
    with pytest.raises(ValueError, match="petsc_options_prefix"):
        nf.KrylovSolver(A, petsc_options_prefix="")
    A.destroy()
