"""Foundation check: P1 Poisson converges at L2 rate 2 through the package's Krylov solver."""

from nngf_fem import KrylovSolver

import numpy as np
import pytest
import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import apply_lifting, assemble_matrix, assemble_vector, set_bc
from mpi4py import MPI
from petsc4py import PETSc


def poisson_l2_error(n: int) -> float:
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, n, n)
    V = fem.functionspace(msh, ("Lagrange", 1))
    x = ufl.SpatialCoordinate(msh)
    u_ex = ufl.sin(ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
    f = 2 * ufl.pi**2 * u_ex
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = fem.form(ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
    L = fem.form(f * v * ufl.dx)
    msh.topology.create_connectivity(1, 2)
    facets = mesh.exterior_facet_indices(msh.topology)
    bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(V, 1, facets), V)
    A = assemble_matrix(a, bcs=[bc])
    A.assemble()
    b = assemble_vector(L)
    apply_lifting(b, [a], [[bc]])
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    set_bc(b, [bc])
    uh = fem.Function(V)
    solver = KrylovSolver(
        A,
        petsc_options_prefix="test_poisson_",
        defaults={"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-12},
    )
    solver.solve(b, uh.x.petsc_vec)
    uh.x.scatter_forward()
    solver.destroy()
    A.destroy()
    b.destroy()
    err = fem.assemble_scalar(fem.form((uh - u_ex) ** 2 * ufl.dx(degree=6)))
    return np.sqrt(comm.allreduce(err, op=MPI.SUM))


def test_p1_poisson_l2_rate_is_two():
    ns = [8, 16, 32]
    errs = [poisson_l2_error(n) for n in ns]
    rates = [np.log(errs[i] / errs[i + 1]) / np.log(2) for i in range(len(ns) - 1)]
    assert errs[-1] < 2e-3
    assert all(r == pytest.approx(2.0, abs=0.1) for r in rates), rates
