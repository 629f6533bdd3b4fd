# # Poisson solve through nngf_fem's Krylov solver (foundation smoke demo)
#
# Solves -Δu = f on the unit square with u = sin(πx) sin(πy), P1 elements, CG + GAMG,
# prints the L2 error on rank 0 and asserts it is at discretization level.
#
#     mpirun -n 2 python demos/demo_poisson.py --n 64

import nngf_fem  # noqa: F401  (load order for the pip DOLFINx wheel)
from nngf_fem import KrylovSolver

import argparse

import numpy as np
import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import apply_lifting, assemble_matrix, assemble_vector, set_bc
from mpi4py import MPI
from petsc4py import PETSc

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--n", type=int, default=64, help="cells per side")
args = parser.parse_args()

comm = MPI.COMM_WORLD
msh = mesh.create_unit_square(comm, args.n, args.n)
V = fem.functionspace(msh, ("Lagrange", 1))
x = ufl.SpatialCoordinate(msh)
u_ex = ufl.sin(ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
a = fem.form(ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
L = fem.form(2 * ufl.pi**2 * u_ex * v * ufl.dx)
msh.topology.create_connectivity(1, 2)
bc = fem.dirichletbc(
    0.0, fem.locate_dofs_topological(V, 1, mesh.exterior_facet_indices(msh.topology)), V
)
A = assemble_matrix(a, bcs=[bc])
A.assemble()
b = assemble_vector(L)
apply_lifting(b, [a], [[bc]])
b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
set_bc(b, [bc])
uh = fem.Function(V)
solver = KrylovSolver(A, petsc_options_prefix="demo_poisson_",
                      defaults={"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-10})
its = solver.solve(b, uh.x.petsc_vec)
uh.x.scatter_forward()
err = np.sqrt(comm.allreduce(fem.assemble_scalar(fem.form((uh - u_ex) ** 2 * ufl.dx)), MPI.SUM))
if comm.rank == 0:
    print(f"Poisson P1 n={args.n}: {V.dofmap.index_map.size_global} dofs on {comm.size} rank(s), "
          f"CG+GAMG {its} its, L2 error {err:.3e}")
solver.destroy()
A.destroy()
b.destroy()
assert err < 2.0 / args.n**2, err
