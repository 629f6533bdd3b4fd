"""B8: Young's modulus from noisy displacements (plane-strain elasticity) -- NG vs FE GN-CG.

    python benchmarks/b8_elasticity.py [--n 32] [--repeats 1] [--quick]

Plane-strain linear elasticity on the unit square (P1 vector displacement u, n x n
cells), clamped on the left edge x = 0, body force (0, -1) and traction (1, 0) on the
right edge x = 1; Poisson ratio 0.3 and Young's modulus

    E_true = exp(0.5 sin(2 pi x) sin(pi y) - 0.4 exp(-((x - 0.3)^2 + (y - 0.7)^2) / 0.02)).

Full-field displacement data with 1% noise (``nf.add_noise``: standard deviation 1% of
max |u|), misfit 1/2 ||u - u_obs||^2 / ||u_obs||^2, H1 Tikhonov alpha/2 ||E - 1||_H1^2
(alpha = 1e-7). The metric is ``nf.H1(E, alpha=1.0, beta=0.01)`` (length scale 0.1)
everywhere. Methods, all started at E = 1:

* ``ng_expand``: ``E = exp(N(x))`` from a width-2 MLP, ``NaturalGradientFlow`` with the
  default curvature (``curvature="auto"``: a Gauss-Newton variant for a PDE energy; the
  table names the one used) and ``expansion=ExpansionPolicy()``;
* ``ng_fixed``: the same with a fixed width-16 network;
* ``ng_fo_expand``: the first-order flow (``curvature="none"``), expansive -- the paper's
  method, for contrast;
* ``fe_gncg``: ``nf.GaussNewtonCG`` on ``nf.FEControl(V_P1, transform="exp")``;
* ``fe_lmvm``: TAO LMVM with the H1 Riesz map as initial Hessian, same FE control.

Every run stops at Morozov's discrepancy principle (misfit <= --tau x the misfit of the
noisy data against the noise-free state) or at its budget. Reported at the stop: relative
L2 error of E, PDE solves (``energy.pde_solves``: forward + adjoint + incremental pairs),
factorizations, wall time (the benchmark's own recording excluded; median of --repeats),
and the ratio of each method's error to the FE Gauss-Newton-CG error (issue 13 asks for
<= 1.2 for the network method). Writes JSON.
"""

import nngf_fem as nf  # noqa: I001

import argparse
import math
import time

import numpy as np
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI

from _common import RESULTS, choices, flow_summary, median, print_table, smooth_truth, write_json

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=32, help="cells per side")
parser.add_argument("--noise", type=float, default=0.01, help="relative noise level")
parser.add_argument("--alpha", type=float, default=1e-7, help="H1 Tikhonov weight")
parser.add_argument("--nu", type=float, default=0.3, help="Poisson ratio")
parser.add_argument("--tau", type=float, default=1.1, help="discrepancy factor")
parser.add_argument("--ng-iterations", type=int, default=100, help="network budget")
parser.add_argument("--gn-iterations", type=int, default=30, help="GN-CG budget")
parser.add_argument("--fe-iterations", type=int, default=200, help="TAO LMVM budget")
parser.add_argument("--width", type=int, default=16, help="fixed width")
parser.add_argument("--methods", default="ng_expand,ng_fixed,ng_fo_expand,fe_gncg,fe_lmvm")
parser.add_argument("--repeats", type=int, default=1)
parser.add_argument("--seed", type=int, default=0, help="torch seed of the networks")
parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (0 = keep)")
parser.add_argument("--quick", action="store_true", help="smoke run (8x8, few iterations)")
parser.add_argument("--out", default=str(RESULTS / "b8_elasticity.json"))
args = parser.parse_args()
if args.quick:
    args.n, args.ng_iterations, args.gn_iterations, args.fe_iterations = 8, 6, 3, 10
if args.threads > 0:
    import numpy.linalg  # noqa: F401  (load numpy's BLAS so that it can be limited too)

    torch.set_num_threads(args.threads)
    nf._backend.limit_blas_threads(args.threads)
comm = MPI.COMM_WORLD
LABELS = {"ng_expand": "NG default flow ({c}), expansive from width 2",
          "ng_fixed": "NG default flow ({c}), fixed width {w}",
          "ng_fo_expand": "NG first-order ({c}), expansive from width 2",
          "fe_gncg": "FE P1 exp(m), Gauss-Newton-CG",
          "fe_lmvm": "FE P1 exp(m), TAO LMVM, J0 = H1 Riesz"}


class Problem:
    """Mesh, spaces, loads, noisy displacement data and the noise level."""

    def __init__(self, n: int):
        self.msh = mesh.create_unit_square(comm, n, n)
        x = ufl.SpatialCoordinate(self.msh)
        self.E_true = smooth_truth(x)
        self.V = fem.functionspace(self.msh, ("Lagrange", 1, (2,)))
        self.Q = fem.functionspace(self.msh, ("Lagrange", 1))
        fdim = self.msh.topology.dim - 1
        self.msh.topology.create_connectivity(fdim, fdim + 1)
        left = mesh.locate_entities_boundary(self.msh, fdim, lambda p: np.isclose(p[0], 0.0))
        right = mesh.locate_entities_boundary(self.msh, fdim, lambda p: np.isclose(p[0], 1.0))
        self.bc = fem.dirichletbc(np.zeros(2), fem.locate_dofs_topological(self.V, fdim, left),
                                  self.V)
        tags = mesh.meshtags(self.msh, fdim, np.sort(right), np.full(right.size, 1, np.int32))
        self.ds_right = ufl.Measure("ds", domain=self.msh, subdomain_data=tags)(1)
        self.body = fem.Constant(self.msh, np.array([0.0, -1.0]))
        self.traction = fem.Constant(self.msh, np.array([1.0, 0.0]))
        probe = nf.FEControl(self.Q, transform="identity")
        Et = fem.Function(self.Q)
        Et.interpolate(fem.Expression(self.E_true, self.Q.element.interpolation_points))
        u = fem.Function(self.V, name="u")
        pre = nf.PDEConstrainedEnergy(self.residual(probe.ufl, u), u, [self.bc], control=probe,
                                      misfit=0.5 * ufl.inner(u, u) * ufl.dx)
        u_clean = nf.pde.synthetic_state(pre, Et)
        pre.destroy()
        self.u_obs = nf.add_noise(u_clean, args.noise, seed=0)
        self.scale = 1.0 / self.assemble(ufl.inner(self.u_obs, self.u_obs) * ufl.dx)
        d = self.u_obs - u_clean
        self.noise_misfit = 0.5 * self.scale * self.assemble(ufl.inner(d, d) * ufl.dx)
        self.E_norm = math.sqrt(self.assemble(self.E_true**2 * ufl.dx))
        self.dofs = self.V.dofmap.index_map.size_global * self.V.dofmap.index_map_bs
        self.u_max = comm.allreduce(float(np.max(np.abs(u_clean.x.array), initial=0.0)),
                                    op=MPI.MAX)

    def assemble(self, integrand) -> float:
        return comm.allreduce(fem.assemble_scalar(fem.form(integrand)))

    def residual(self, E, u):
        """Plane strain: sigma = 2 mu eps + lambda tr(eps) I with mu, lambda from E, nu."""
        nu = args.nu
        mu = E / (2.0 * (1.0 + nu))
        lmbda = E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))
        v = ufl.TestFunction(self.V)

        def eps(w):
            return ufl.sym(ufl.grad(w))

        sigma = 2.0 * mu * eps(u) + lmbda * ufl.tr(eps(u)) * ufl.Identity(2)
        return (ufl.inner(sigma, eps(v)) * ufl.dx - ufl.inner(self.body, v) * ufl.dx
                - ufl.inner(self.traction, v) * self.ds_right)

    def energy(self, control) -> nf.PDEConstrainedEnergy:
        u = fem.Function(self.V, name="u")
        return nf.PDEConstrainedEnergy(
            self.residual(control.ufl, u), u, [self.bc], control=control,
            misfit=0.5 * self.scale * ufl.inner(u - self.u_obs, u - self.u_obs) * ufl.dx,
            regularization=nf.Tikhonov(args.alpha, "H1", reference=1.0))


class Recorder:
    """Per-iteration PDE solves, wall time (recording excluded), E error and misfit."""

    def __init__(self, problem: Problem, energy, control, target: float):
        self.energy, self.control, self.target = energy, control, target
        self.err_form = fem.form((control.ufl - problem.E_true) ** 2 * ufl.dx)
        self.E_norm = problem.E_norm
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()
        self.overhead = 0.0

    def record(self, misfit: float | None = None) -> bool:
        t = time.perf_counter()
        err = math.sqrt(comm.allreduce(fem.assemble_scalar(self.err_form))) / self.E_norm
        c = self.energy.counters
        self.rows.append({
            "pde_solves": self.energy.pde_solves, "factorizations": c.get("factorizations"),
            "back_substitutions": c.get("back_substitutions"),
            "wall": t - self.t0 - self.overhead, "E_err": err,
            "n_params": self.control.num_params,
            "misfit": self.energy.misfit_value() if misfit is None else misfit})
        self.overhead += time.perf_counter() - t
        return self.rows[-1]["misfit"] <= self.target


def run_ng(problem: Problem, method: str, target: float) -> Recorder:
    torch.manual_seed(args.seed)
    width = args.width if method == "ng_fixed" else 2
    E = nf.NeuralField(problem.msh, nf.MLP(2, width=width, depth=1), transform="exp",
                       name="E")
    energy = problem.energy(E)
    metric = nf.H1(E, alpha=1.0, beta=0.01)
    flow = nf.NaturalGradientFlow(
        energy, metric, curvature="none" if method == "ng_fo_expand" else "auto",
        expansion=None if method == "ng_fixed" else nf.ExpansionPolicy())
    rec = Recorder(problem, energy, E, target)
    energy.value()  # the flow's first evaluation (cached: counted once)
    rec.record()

    def monitor(fl, r):
        return rec.record()

    result = flow.run(args.ng_iterations, callback=monitor)
    rec.extra = flow_summary(flow, result)
    flow.destroy()
    metric.destroy()
    energy.destroy()
    return rec


def run_fe(problem: Problem, method: str, target: float) -> Recorder:
    E = nf.FEControl(problem.Q, transform="exp", name="E")  # E = 1
    energy = problem.energy(E)
    if method == "fe_gncg":
        solver = nf.GaussNewtonCG(energy, alpha=1.0, beta=0.01, petsc_options_prefix="b8_gncg_")
        budget = args.gn_iterations
    else:
        solver = nf.TaoSolver(energy, alpha=1.0, beta=0.01, petsc_options_prefix="b8_tao_")
        budget = args.fe_iterations
    rec = Recorder(problem, energy, E, target)

    def monitor(s, r):
        return rec.record(misfit=r["misfit"])

    result = solver.run(budget, callback=monitor)
    rec.extra = {"reason": result.reason}
    solver.destroy()
    energy.destroy()
    return rec


t_start = time.perf_counter()
methods = choices(args.methods, LABELS)
problem = Problem(args.n)
target = args.tau * problem.noise_misfit
budgets = {"ng_expand": args.ng_iterations, "ng_fixed": args.ng_iterations,
           "ng_fo_expand": args.ng_iterations, "fe_gncg": args.gn_iterations,
           "fe_lmvm": args.fe_iterations}
rows = []
for m in methods:
    reps = [(run_fe if m.startswith("fe_") else run_ng)(problem, m, target)
            for _ in range(args.repeats)]
    tr = reps[0].rows
    last = tr[-1]
    reached = last["misfit"] <= target
    row = {"method": m, "label": LABELS[m].format(w=args.width,
                                                  c=reps[0].extra.get("curvature", "-")),
           "budget": budgets[m],
           "reached": reached, "iterations": len(tr) - 1,
           "stop": "noise level" if reached else "budget",
           "E_err": last["E_err"], "best_E_err": min(r["E_err"] for r in tr),
           "misfit_ratio": last["misfit"] / problem.noise_misfit,
           "pde_solves": last["pde_solves"], "factorizations": last["factorizations"],
           "back_substitutions": last["back_substitutions"],
           "wall": median([rep.rows[-1]["wall"] for rep in reps]),
           "wall_all": [rep.rows[-1]["wall"] for rep in reps],
           "n_params": last["n_params"], **reps[0].extra,
           "trajectory": {k: [r[k] for r in tr] for k in ("pde_solves", "E_err", "misfit",
                                                          "n_params")}}
    rows.append(row)
    if comm.rank == 0:
        print(f"  {m}: {row['stop']} after {row['iterations']} its, {row['pde_solves']} PDE "
              f"solves, E err {row['E_err']:.4f}, misfit {row['misfit_ratio']:.2f}x noise, "
              f"{row['wall']:.2f} s", flush=True)
gn = next((r for r in rows if r["method"] == "fe_gncg"), None)
for r in rows:
    r["E_err_vs_gncg"] = r["E_err"] / gn["E_err"] if gn is not None else None
print_table(
    f"B8: plane-strain elasticity, E from displacements, P1 {args.n}x{args.n} "
    f"({problem.dofs} displacement dofs), noise {args.noise:g}, alpha {args.alpha:g}, "
    f"{comm.size} rank(s); stop at misfit <= {args.tau:g} x {problem.noise_misfit:.3e} or "
    f"the budget; median time of {args.repeats}",
    [("label", "method"), ("stop", "stop"), ("iterations", "its"), ("n_params", "unknowns"),
     ("E_err", "E err at stop"), ("E_err_vs_gncg", "E err / FE GN-CG"),
     ("best_E_err", "best E err"), ("misfit_ratio", "misfit / noise"),
     ("pde_solves", "PDE solves"), ("factorizations", "factorizations"),
     ("wall", "time [s]")], rows)
total = time.perf_counter() - t_start
ng = next((r for r in rows if r["method"] == "ng_expand"), None)
criterion = None
if ng is not None and gn is not None:
    criterion = ng["E_err_vs_gncg"] <= 1.2
if comm.rank == 0:
    if criterion is not None:
        print(f"\nexpansive NG error / FE GN-CG error: {ng['E_err_vs_gncg']:.3f} "
              f"(issue 13 target <= 1.2: {'yes' if criterion else 'no'})")
    print(f"total wall time {total:.1f} s")
write_json(args.out, {"benchmark": "B8", "args": vars(args), "dofs": problem.dofs,
                      "noise_misfit": problem.noise_misfit, "u_max": problem.u_max,
                      "criterion_ng_within_1.2_of_gncg": criterion, "total_s": total,
                      "rows": rows})
if comm.rank == 0:
    print(f"wrote {args.out}")
