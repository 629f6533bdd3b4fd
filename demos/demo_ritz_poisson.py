# # Solving Poisson's equation by Ritz energy minimization with a natural neural gradient flow
#
# $-\Delta u = f$ on the unit square, $u = 0$ on the boundary, exact solution
# $u = \sin(\pi x) \sin(\pi y)$. The network $N$ (tanh, 2-W-1) enters through
# $u = x(1-x)\, y(1-y)\, N(x)$, so the boundary condition holds exactly. The energy
#
# $$E(u) = \frac{1}{2} \int_\Omega |\nabla u|^2 \,dx - \int_\Omega f u \,dx$$
#
# is minimized with the natural gradient in the energy metric: $G = J^T K J$ with $K$ the
# $H^1_0$ stiffness matrix (a Gauss-Newton step for this quadratic energy), solved
# matrix-free by PETSc CG.
#
#     mpirun -n 2 python demos/demo_ritz_poisson.py --n 16 --degree 3 --iterations 60

import nngf_fem as nf  # noqa: I001  (first: load order for the pip DOLFINx wheel)

import argparse
import pathlib
import time

import numpy as np
import torch
import ufl
from tqdm.auto import tqdm
from dolfinx import fem, mesh
from mpi4py import MPI

parser = argparse.ArgumentParser(description="Ritz/Poisson with a natural neural gradient flow")
parser.add_argument("--n", type=int, default=16, help="cells per side")
parser.add_argument("--degree", type=int, default=3, help="Lagrange degree of Q_h")
parser.add_argument("--width", type=int, default=32, help="hidden neurons")
parser.add_argument("--iterations", type=int, default=60)
parser.add_argument("--tol", type=float, default=1e-5, help="asserted relative L2 error")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--precond", default="nystrom", choices=["nystrom", "none"],
                    help="preconditioner of the natural-gradient CG")
parser.add_argument("--method", default="krylov", choices=["krylov", "dense"],
                    help="natural-gradient solve: matrix-free PETSc KSP or dense")
parser.add_argument("--out", default="out_ritz_poisson", help="output folder")
parser.add_argument("--quiet", action="store_true")
parser.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint interval")
parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
args = parser.parse_args()

# ## The network, the energy and the metric
#
# `factor=bubble` multiplies the network by $x(1-x)\,y(1-y)$ at the dofs of the
# Lagrange space of degree `--degree` into which it is interpolated. `nf.RitzEnergy` takes
# the bilinear form $a$ and the linear form $\ell$ as functions of UFL arguments; the
# metric `nf.H1Seminorm` is $a$ itself, with the boundary dofs constrained.

comm = MPI.COMM_WORLD
torch.manual_seed(args.seed)
msh = mesh.create_unit_square(comm, args.n, args.n)


def bubble(x):
    return x[:, 0] * (1 - x[:, 0]) * x[:, 1] * (1 - x[:, 1])


u = nf.NeuralField(msh, nf.MLP(2, width=args.width, depth=1), element=("Lagrange", args.degree),
                   factor=bubble, name="u")
x = ufl.SpatialCoordinate(msh)
u_exact = ufl.sin(ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
f = 2 * ufl.pi**2 * u_exact
energy = nf.RitzEnergy(u, a=lambda w, v: ufl.inner(ufl.grad(w), ufl.grad(v)) * ufl.dx,
                       l=lambda v: f * v * ufl.dx)

msh.topology.create_connectivity(1, 2)
boundary = fem.locate_dofs_topological(u.space, 1, mesh.exterior_facet_indices(msh.topology))
metric = nf.H1Seminorm(u, bcs=[fem.dirichletbc(0.0, boundary, u.space)])
flow = nf.NaturalGradientFlow(energy, metric, eps=1e-4, method=args.method,
                              preconditioner=None if args.precond == "none" else args.precond)
flow.checkpoint_meta.update({"demo": "ritz_poisson", "n": args.n, "degree": args.degree,
                             "seed": args.seed})  # a resume must belong to this problem

# ## Monitoring and the run
#
# The callback adds the relative $L^2$ error against the exact solution to each step's
# record; `flow.run` checkpoints every `--checkpoint-every` iterations.

err_form = fem.form((u.ufl - u_exact) ** 2 * ufl.dx(degree=2 * args.degree + 2))
ref = np.sqrt(comm.allreduce(fem.assemble_scalar(fem.form(u_exact**2 * ufl.dx(degree=8)))))


def rel_error() -> float:
    return float(np.sqrt(comm.allreduce(fem.assemble_scalar(err_form))) / ref)


out = pathlib.Path(args.out)
ckpt = out / "checkpoint.pt"
if args.resume and ckpt.exists():
    nf.load_checkpoint(ckpt, flow)
    if comm.rank == 0 and not args.quiet:
        print(f"resumed from {ckpt} at iteration {flow.iteration}")
t0 = time.perf_counter()


def monitor(fl, rec):
    """Record the error against the exact solution; print on rank 0."""
    rec["rel_l2_error"] = rel_error()
    rec["wall"] = time.perf_counter() - t0
    it = rec["iteration"]
    if comm.rank == 0 and not args.quiet and (it < 5 or (it + 1) % 10 == 0):
        tqdm.write(f"it {it + 1:4d}  E {rec['energy']:.12f}  rel L2 err "
                   f"{rec['rel_l2_error']:.3e}  align {rec['alignment']:.3f}  "
                   f"eps {rec['eps']:.1e}  CG its {rec['ksp_its']}")


flow.run(args.iterations, callback=monitor, checkpoint=str(ckpt),
         checkpoint_every=args.checkpoint_every, progress=not args.quiet)
history = flow.history
reached = next((h["iteration"] + 1 for h in history if h["rel_l2_error"] <= args.tol), None)
final = history[-1]["rel_l2_error"]
nf.io.write_history(out, history, comm, meta={"demo": "ritz_poisson", "args": vars(args)})
nf.io.plot_history(out / "history.png", history, comm, extra=("rel_l2_error",))
exact = fem.Function(u.space, name="u_exact")
exact.interpolate(fem.Expression(u_exact, u.space.element.interpolation_points))
nf.io.write_fields(out / "solution.bp", [u.function, exact])
nf.io.plot_fields(out / "solution.png", [("network u_theta", u.function), ("exact u", exact)])
if comm.rank == 0:
    print(f"\nRitz/Poisson: {u.space.dofmap.index_map.size_global} dofs (P{args.degree}), "
          f"network 2-{args.width}-1 ({u.num_params} parameters), {comm.size} rank(s)")
    print(f"  relative L2 error {final:.3e} after {args.iterations} iterations "
          f"({time.perf_counter() - t0:.1f} s); <= {args.tol:g} first at iteration {reached}")
    print(f"  outputs in {out}/: history.{{json,csv,png}}, solution.png, solution.bp (ParaView)")
flow.destroy()
assert final <= args.tol, f"relative L2 error {final:.3e} > {args.tol:g}"
