# # Darcy coefficient identification with a natural neural gradient flow
#
# Recover the permeability $k$ in $-\nabla \cdot (k \nabla y) = f$ on the unit square,
# $y = 0$ on the boundary, from full-field state data with 1% Gaussian noise. The
# unknown $k = \exp(N_\theta(x))$ is a tanh network on the mesh. The reduced energy
#
# $$E(k) = \frac{1}{2} \frac{\|y(k) - y_\text{obs}\|^2}{\|y_\text{obs}\|^2}
#        + \frac{\alpha}{2} \|k - 1\|_{H^1}^2$$
#
# has its exact derivative from one adjoint solve. The network starts at $k = 1$ (the
# default start of `transform="exp"`). The flow is the Gauss-Newton natural gradient:
# Levenberg-Marquardt in the network's tangent space with the misfit's Gauss-Newton
# metric, damped by the Gram matrix $J^T (M + l^2 K) J$ of the $H^1$ metric ($l$ a length
# scale, default 0.1); `--curvature none` gives the paper's first-order flow. With
# `--expand` the network starts from 2 neurons and grows when the mean alignment is low
# or the misfit stalls. The run stops at Morozov's noise level (1.1 x).
#
#     mpirun -n 2 python demos/demo_darcy_inversion.py --expand

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

parser = argparse.ArgumentParser(description="Darcy inversion with a natural neural gradient flow")
parser.add_argument("--n", type=int, default=32, help="cells per side (built-in mesh)")
parser.add_argument("--mesh", default=None, help="gmsh .msh file instead of the unit square")
parser.add_argument("--observe-tag", type=int, default=None,
                    help="observe the state only on cells with this physical tag")
parser.add_argument("--width", type=int, default=16, help="hidden neurons (fixed network)")
parser.add_argument("--expand", action="store_true", help="start from 2 neurons and grow")
parser.add_argument("--max-width", type=int, default=24, help="width limit for --expand")
parser.add_argument("--iterations", type=int, default=60)
parser.add_argument("--nonlinear", action="store_true", help="forward model with a + y^3 term")
parser.add_argument("--noise", type=float, default=0.01, help="relative noise level")
parser.add_argument("--alpha", type=float, default=1e-7, help="H1 Tikhonov weight")
parser.add_argument("--metric", default="H1", choices=["H1", "L2", "Euclidean"])
parser.add_argument("--length-scale", type=float, default=0.1,
                    help="length scale l of the H1 metric ||k||^2 + l^2 ||grad k||^2")
parser.add_argument("--eps", type=float, default=None,
                    help="damping of the Gram system (default: the flow's)")
parser.add_argument("--curvature", default="auto", choices=nf.flow.CURVATURES,
                    help="step method: Gauss-Newton natural gradient (auto), lbfgs, or none "
                    "(the first-order flow)")
parser.add_argument("--morozov", type=float, default=1.1,
                    help="stop when the misfit is below this factor times the noise level "
                    "(0: run all iterations)")
parser.add_argument("--tol", type=float, default=0.1, help="asserted relative L2 error of k")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="out_darcy_inversion")
parser.add_argument("--checkpoint-every", type=int, default=10)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--quiet", action="store_true")
args = parser.parse_args()

# ## Mesh and the true coefficient
#
# The unit square, or a gmsh mesh with physical markers (`--mesh`); with `--observe-tag`
# the state is observed only on the cells of that tag (the measure `dx_obs`). The truth
# is a smooth field with a localized dip of width 0.1.

comm = MPI.COMM_WORLD
if args.observe_tag is not None and not args.mesh:
    parser.error("--observe-tag needs --mesh (a gmsh mesh with cell tags)")
if args.mesh:  # a gmsh mesh with physical markers (see meshes/make_meshes.py)
    mesh_data = nf.meshes.load_msh(args.mesh, comm)
    msh, cell_tags = mesh_data.mesh, mesh_data.cell_tags
    if args.observe_tag is not None:  # a tag of no cell: nothing observed, 0/0 below
        nf.meshes.check_tag(cell_tags, args.observe_tag, "--observe-tag")
else:
    msh, cell_tags = mesh.create_unit_square(comm, args.n, args.n), None
dx_obs = (ufl.Measure("dx", domain=msh, subdomain_data=cell_tags)(args.observe_tag)
          if args.observe_tag is not None else ufl.dx)
x = ufl.SpatialCoordinate(msh)
k_true_expr = ufl.exp(0.5 * ufl.sin(2 * ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
                      - 0.4 * ufl.exp(-((x[0] - 0.3) ** 2 + (x[1] - 0.7) ** 2) / 0.02))

# ## The network and the state equation
#
# `nf.NeuralField` puts the network on the mesh: `k.ufl` is a `fem.Function` that goes
# into any UFL form, here the residual $F(y, k; v)$ of the state equation, written as for
# any FEniCSx problem. Seeding torch makes the run reproducible; the parameters are
# identical on all ranks in any case (broadcast from rank 0).

torch.manual_seed(args.seed)
width = 2 if args.expand else args.width
k = nf.NeuralField(msh, nf.MLP(2, width=width, depth=1), transform="exp", name="k")
V = fem.functionspace(msh, ("Lagrange", 1))
y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
f = 10.0


def residual(kk):
    F = ufl.inner(kk * ufl.grad(y), ufl.grad(v)) * ufl.dx - f * v * ufl.dx
    if args.nonlinear:  # -div(k grad y) + y^3 = f, solved by Newton
        F += y**3 * v * ufl.dx
    return F


msh.topology.create_connectivity(1, 2)
bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(V, 1, mesh.exterior_facet_indices(
    msh.topology)), V)

# ## Synthetic data
#
# Solve the state equation with the true coefficient (interpolated into the control's
# space) and add Gaussian noise of standard deviation `noise` x max|y| with `nf.add_noise`
# (the same noisy data on any number of ranks). The misfit is normalized by
# $\|y_\text{obs}\|^2$; `noise_misfit`, the misfit of the noisy data at the clean state,
# is the noise level of Morozov's discrepancy principle.

k_true = fem.Function(k.space, name="k_true")
k_true.interpolate(fem.Expression(k_true_expr, k.space.element.interpolation_points))
# a throwaway energy on the same forms solves the state for k_true
energy = nf.PDEConstrainedEnergy(residual(k.ufl), y, [bc], control=k,
                                 misfit=0.5 * y**2 * ufl.dx)  # misfit replaced below
y_clean = nf.pde.synthetic_state(energy, k_true)
energy.destroy()
y_obs = nf.add_noise(y_clean, args.noise, seed=args.seed)
y_obs.name = "y_obs"
scale = 1.0 / comm.allreduce(fem.assemble_scalar(fem.form(y_obs**2 * dx_obs)))
noise_misfit = 0.5 * scale * comm.allreduce(
    fem.assemble_scalar(fem.form((y_obs - y_clean) ** 2 * dx_obs)))
y.x.array[:] = 0.0

# ## Energy, metric and flow
#
# `nf.PDEConstrainedEnergy` derives the forward (Newton), adjoint and Gauss-Newton solves
# from the UFL forms. The metric $\|k\|^2 + l^2 \|\nabla k\|^2$ is `nf.H1(k, alpha=1,
# beta=l**2)`; with `--expand` an `nf.ExpansionPolicy` lets the flow grow the network.

energy = nf.PDEConstrainedEnergy(residual(k.ufl), y, [bc], control=k,
                                 misfit=0.5 * scale * (y - y_obs) ** 2 * dx_obs,
                                 regularization=nf.Tikhonov(args.alpha, "H1", reference=1.0))
if args.metric == "H1":  # ||k||^2 + l^2 ||grad k||^2: H1 with the length scale of the features
    metric = nf.H1(k, alpha=1.0, beta=args.length_scale**2)
else:
    metric = {"L2": nf.L2, "Euclidean": nf.Euclidean}[args.metric](k)
policy = nf.ExpansionPolicy(max_params=4 * args.max_width + 1) if args.expand else None
flow = nf.NaturalGradientFlow(energy, metric, curvature=args.curvature, expansion=policy,
                              **({} if args.eps is None else {"eps": args.eps}))
flow.checkpoint_meta.update({"demo": "darcy_inversion", "n": args.n, "mesh": args.mesh,
                             "nonlinear": args.nonlinear})

# ## Monitoring and the stop at the noise level
#
# The callback receives each step's record (see the documentation's page on run
# records), adds the error of $k$ and the misfit to it, and stops the run when the misfit
# is below `--morozov` times the noise level (the stop is decided on all ranks together;
# `nf.discrepancy_stop` is the same rule as a ready-made callback).

err_form = fem.form((k.ufl - k_true_expr) ** 2 * ufl.dx)
k_norm = np.sqrt(comm.allreduce(fem.assemble_scalar(fem.form(k_true_expr**2 * ufl.dx))))
if args.observe_tag is not None and comm.rank == 0 and not args.quiet:
    print(f"observing the state only on cells tagged {args.observe_tag} of {args.mesh}")
out = pathlib.Path(args.out)
ckpt = out / "checkpoint.pt"
if args.resume and ckpt.exists():
    nf.load_checkpoint(ckpt, flow)
t0 = time.perf_counter()


def monitor(fl, rec):
    """Error of k, misfit, PDE solves; expansion; printing on rank 0."""
    rec["k_rel_l2_error"] = float(np.sqrt(comm.allreduce(fem.assemble_scalar(err_form))) / k_norm)
    rec["misfit"] = energy.misfit_value()
    rec["pde_solves"] = energy.pde_solves
    rec["wall"] = time.perf_counter() - t0
    if comm.rank == 0 and not args.quiet and (rec["iteration"] + 1) % 10 == 0:
        tqdm.write(f"it {rec['iteration'] + 1:4d}  misfit {rec['misfit']:.3e}  "
                   f"k err {rec['k_rel_l2_error']:.3e}  align {rec['alignment']:.2f}  "
                   f"P {rec['n_params']}")
    e = fl.expansions[-1] if fl.expansions else None
    if e is not None and e["iteration"] == rec["iteration"] and comm.rank == 0 \
            and not args.quiet:
        tqdm.write(f"     it {e['iteration']}: expand ({e['kind']}) {e['params_before']} -> "
                   f"{e['params_after']} parameters, alignment "
                   f"{e['alignment_before']:.2f} -> {e.get('alignment_after', float('nan')):.2f}")
    # Morozov's discrepancy principle: stop at the noise level (decided on all ranks)
    return args.morozov > 0 and rec["misfit"] <= args.morozov * noise_misfit


# ## Run and outputs
#
# `flow.run` writes a checkpoint every `--checkpoint-every` iterations (`--resume`
# continues from it). The history goes to `history.{json,csv,png}`, the fields to
# `fields.bp` (ParaView) and `coefficient.png`.

flow.run(args.iterations, callback=monitor, checkpoint=str(ckpt),
         checkpoint_every=args.checkpoint_every, progress=not args.quiet)
steps = [h for h in flow.history if h.get("kind") is None]
final = steps[-1]
nf.io.write_history(out, flow.history, comm, meta={"demo": "darcy_inversion", "args": vars(args),
                                                   "noise_misfit": noise_misfit})
nf.io.plot_history(out / "history.png", flow.history, comm, extra=("k_rel_l2_error", "misfit"))
nf.io.write_fields(out / "fields.bp", [k.function, k_true])
nf.io.plot_fields(out / "coefficient.png", [("true k", k_true), ("recovered k", k.function)])
if comm.rank == 0:
    print(f"\nDarcy inversion: {V.dofmap.index_map.size_global} state dofs, {comm.size} rank(s), "
          f"noise {args.noise:g}, metric {args.metric}{', expansive' if args.expand else ''}"
          f"{', nonlinear (Newton)' if args.nonlinear else ''}")
    print(f"  relative L2 error of k  {final['k_rel_l2_error']:.4e}")
    print(f"  misfit                  {final['misfit']:.4e}  (noise level {noise_misfit:.4e})")
    print(f"  iterations              {flow.iteration}   network {k.num_params} parameters")
    print(f"  PDE solves              {final['pde_solves']}  (forward + adjoint + "
          f"Gauss-Newton pairs; {energy.counters['factorizations']} factorizations, "
          f"{energy.counters['newton_iterations']} Newton iterations)")
    print(f"  wall time               {time.perf_counter() - t0:.1f} s")
    print(f"  outputs in {out}/: coefficient.png, history.{{png,json,csv}}, fields.bp (ParaView)")
E = [h["energy"] for h in steps]
assert all(b <= a for a, b in zip(E, E[1:], strict=False)), "energy increased"
assert final["k_rel_l2_error"] <= args.tol, f"k error {final['k_rel_l2_error']:.3e} > {args.tol}"
flow.destroy()
energy.destroy()
