"""B2: Ritz/Poisson -- natural gradient (energy / L2 / Euclidean Gram) vs Adam and L-BFGS.

    mpirun -n 1 python benchmarks/b2_ritz.py [--n 16] [--degree 4] [--width 32] [--repeats 3]

-Laplace(u) = f on the unit square, u = 0 on the boundary, exact solution
sin(pi x) sin(pi y), solved by minimizing the Ritz energy E(u) = 1/2 a(u, u) - (f, u),
a(u, v) = (grad u, grad v), over u = x(1-x) y(1-y) N(x) with a tanh MLP 2-W-1 N
interpolated into P_degree (as demos/demo_ritz_poisson.py). Every method starts from
the same network (torch seed ``--seed``) and minimizes the same energy with the same FE
machinery; only the update rule differs:

* ``NG-energy``: :class:`nngf_fem.NaturalGradientFlow` with the Gram matrix in the energy
  metric, G = J^T K J, K the H1_0 stiffness matrix (``nf.H1Seminorm`` with the Dirichlet
  rows, as in the demo: a Gauss-Newton step for this quadratic energy);
* ``NG-energy-exp``: the same, expansive: ``expansion=nf.ExpansionPolicy(max_params=
  --max-params)`` (otherwise the default policy), from the same 2-W-1 network;
* ``NG-L2``, ``NG-Euclid``: the same flow with the L2 (mass matrix) and the Euclidean
  Gram matrix; all four with the initial damping ``--eps`` (default 1e-8; the demo uses
  1e-4) and otherwise the library defaults (LM damping, Armijo steps, PETSc CG with the
  Nystrom preconditioner);
  the alignment diagnostic (an extra Riesz solve per step) is off unless ``--alignment``;
* ``Adam``: torch Adam, lr = ``--adam-lr`` = 0.1, the best of 1e-3, 3e-3, 1e-2, 3e-2,
  0.1, 0.3 (final energy errors 0.28, 0.19, 1.5e-2, 7.3e-3, 4.3e-3, 7.7e-3 after 2000
  steps at the default size);
* ``L-BFGS``: torch L-BFGS with the defaults of :mod:`nngf_fem.baselines` (strong Wolfe
  line search, history 50, at most 25 energy evaluations per iteration, torch's
  stopping tolerances off so that it cannot freeze; the table notes a method that stops
  making progress).

The error is the energy-norm distance to the Galerkin solution u_h of the same P_degree
space, ||u - u_h||_a = ||grad(u - u_h)||_L2 (assembled directly; it equals
sqrt(2 (E(u) - E(u_h))), which is checked at the start and recorded); the JSON also has
the relative L2 error against the exact solution (the demo's measure). Each method runs
its own number of iterations (defaults 100 / 2000 / 500 for NG / Adam / L-BFGS: each
method gets a few seconds here, the baselines rather more than the natural gradient).
Time is the cumulative wall time of the steps (a barrier before each step; the error
evaluation is not timed; the one-time setup -- metric assembly, form compilation -- is
recorded as ``setup_s``). A warm-up of two untimed steps per method precedes the
repeats. Every repeat rebuilds everything with the same seed, so trajectories are
identical and only timings vary: the table shows median times and the largest relative
difference of the final errors between repeats. Torch/BLAS use ``--threads`` threads
per rank (default 1: on a shared 2-core machine two threads per rank made single runs
up to 20x slower and the timings erratic).

Thresholds: ``--thresholds`` factors times the best final error of all methods; the
table gives the iterations and median wall time each method needs to first reach them
('-': never reached). The speedup of NG-energy against Adam and L-BFGS is the ratio of
their times to threshold (a lower bound '>' when the baseline never reaches it: its
total time divided by NG-energy's). Writes JSON (args, table rows, raw per-iteration
errors and times of every method and repeat) and a PNG (error vs iterations and vs
wall time). At the defaults the whole run takes about a minute on one rank here.
"""

import nngf_fem as nf  # noqa: I001

import argparse
import math
import pathlib
import time

import numpy as np
import torch
import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import LinearProblem
from mpi4py import MPI

from _common import (RESULTS, first_reach, frozen_from, median, print_table, save_plot,
                     write_json)

METHODS = ("NG-energy", "NG-energy-exp", "NG-L2", "NG-Euclid", "Adam", "L-BFGS")
NG = "NG-energy"

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=16, help="cells per side")
parser.add_argument("--degree", type=int, default=4,
                    help="Lagrange degree of Q_h (P3 cannot reach 1e-6: its u_h is 2.4e-6 off)")
parser.add_argument("--width", type=int, default=32, help="hidden neurons (depth 1)")
parser.add_argument("--ng-iterations", type=int, default=100,
                    help="iterations of each natural-gradient method")
parser.add_argument("--adam-iterations", type=int, default=2000)
parser.add_argument("--lbfgs-iterations", type=int, default=500)
parser.add_argument("--adam-lr", type=float, default=0.1)
parser.add_argument("--eps", type=float, default=1e-8, help="initial NG damping (the demo: 1e-4)")
parser.add_argument("--max-params", type=int, default=200,
                    help="NG-energy-exp: largest network")
parser.add_argument("--methods", default=",".join(METHODS))
parser.add_argument("--thresholds", default="100,10,2",
                    help="error thresholds as factors of the best final error")
parser.add_argument("--alignment", action="store_true",
                    help="compute the alignment (extra Riesz solve) in the NG flows")
parser.add_argument("--threads", type=int, default=1,
                    help="torch/BLAS threads per rank (0: the library default)")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quick", action="store_true",
                    help="tiny sizes and iteration counts (smoke test)")
parser.add_argument("--out", default=str(RESULTS / "b2_ritz.json"))
parser.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
args = parser.parse_args()
if args.quick:
    args.n, args.degree, args.width = 6, 2, 6
    args.ng_iterations, args.adam_iterations, args.lbfgs_iterations = 5, 20, 10
    args.repeats = min(args.repeats, 2)
methods = args.methods.split(",")
if unknown := set(methods) - set(METHODS):
    parser.error(f"unknown methods {sorted(unknown)}; allowed: {', '.join(METHODS)}")
factors = [float(s) for s in args.thresholds.split(",")]
out = pathlib.Path(args.out)
plot_path = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
iterations = {"NG-energy": args.ng_iterations, "NG-energy-exp": args.ng_iterations,
              "NG-L2": args.ng_iterations,
              "NG-Euclid": args.ng_iterations, "Adam": args.adam_iterations,
              "L-BFGS": args.lbfgs_iterations}

threads_before = torch.get_num_threads()
if args.threads > 0:
    torch.set_num_threads(args.threads)
    nf._backend.limit_blas_threads(args.threads)
comm = MPI.COMM_WORLD
msh = mesh.create_unit_square(comm, args.n, args.n)
x = ufl.SpatialCoordinate(msh)
u_exact = ufl.sin(ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
f = 2 * ufl.pi**2 * u_exact
V = fem.functionspace(msh, ("Lagrange", args.degree))
msh.topology.create_connectivity(1, 2)
boundary = fem.locate_dofs_topological(V, 1, mesh.exterior_facet_indices(msh.topology))


def a_form(w, v):
    return ufl.inner(ufl.grad(w), ufl.grad(v)) * ufl.dx


def l_form(v):
    return f * v * ufl.dx


# the Galerkin solution u_h in Q_h (zero Dirichlet data), the reference of the error
w_, v_ = ufl.TrialFunction(V), ufl.TestFunction(V)
problem = LinearProblem(a_form(w_, v_), l_form(v_), bcs=[fem.dirichletbc(0.0, boundary, V)],
                        petsc_options_prefix="b2_galerkin_",
                        petsc_options={"ksp_type": "preonly", "pc_type": "lu",
                                       "pc_factor_mat_solver_type": "mumps"})
u_h = problem.solve()
u_h.x.scatter_forward()
E_h = comm.allreduce(fem.assemble_scalar(fem.form(0.5 * a_form(u_h, u_h) - l_form(u_h))))
del problem
ref_l2 = math.sqrt(comm.allreduce(fem.assemble_scalar(fem.form(u_exact**2 * ufl.dx(degree=8)))))
# the discretization floor: no u in Q_h is closer to the exact solution than about this
galerkin_l2 = math.sqrt(comm.allreduce(fem.assemble_scalar(fem.form(
    (u_h - u_exact) ** 2 * ufl.dx(degree=2 * args.degree + 2))))) / ref_l2


def bubble(p):
    return p[:, 0] * (1 - p[:, 0]) * p[:, 1] * (1 - p[:, 1])


def run(method: str, rep: int, n_iter: int | None = None) -> dict:
    """One method from the seeded initialisation; errors and cumulative step times."""
    comm.Barrier()
    t_setup = time.perf_counter()
    torch.manual_seed(args.seed)
    u = nf.NeuralField(V, nf.MLP(2, width=args.width, depth=1), factor=bubble)
    energy = nf.RitzEnergy(u, a=a_form, l=l_form)
    diff = u.ufl - u_h
    err_a = fem.form(ufl.inner(ufl.grad(diff), ufl.grad(diff)) * ufl.dx)
    err_l2 = fem.form((u.ufl - u_exact) ** 2 * ufl.dx(degree=2 * args.degree + 2))

    def errors_now():
        ea = math.sqrt(max(comm.allreduce(fem.assemble_scalar(err_a)), 0.0))
        el2 = math.sqrt(max(comm.allreduce(fem.assemble_scalar(err_l2)), 0.0)) / ref_l2
        return ea, el2

    metric = None
    if method.startswith("NG-"):
        tag = method[3:].replace("-", "_")
        if method in (NG, "NG-energy-exp"):
            metric = nf.H1Seminorm(u, bcs=[fem.dirichletbc(0.0, boundary, V)],
                                   petsc_options_prefix=f"b2_riesz_{tag}_")
        else:
            metric = {"NG-L2": nf.L2, "NG-Euclid": nf.Euclidean}[method](
                u, petsc_options_prefix=f"b2_riesz_{tag}_")
        policy = (nf.ExpansionPolicy(max_params=args.max_params)
                  if method == "NG-energy-exp" else None)
        opt = nf.NaturalGradientFlow(energy, metric, eps=args.eps, expansion=policy,
                                     alignment=args.alignment or policy is not None,
                                     petsc_options_prefix=f"b2_ng_{tag}_")
    elif method == "Adam":
        opt = nf.TorchOptimizerFlow(energy, "adam", lr=args.adam_lr)
    else:
        opt = nf.TorchOptimizerFlow(energy, "lbfgs")
    E0 = energy.value()
    ea, el2 = errors_now()
    errors, l2_errors = [ea], [el2]
    identity = abs(2.0 * (E0 - E_h) - ea**2) / max(ea**2, 1e-300)
    setup = time.perf_counter() - t_setup
    steps, reason = [], "max_iter"
    for _ in range(iterations[method] if n_iter is None else n_iter):
        comm.Barrier()
        t0 = time.perf_counter()
        rec = opt.step()
        steps.append(time.perf_counter() - t0)
        ea, el2 = errors_now()
        errors.append(ea)
        l2_errors.append(el2)
        if rec.get("stalled"):  # NG: no decrease even at maximal damping
            reason = "stalled"
            break
    # the slowest rank's step times (ranks are synchronised by the steps' reductions)
    steps_max = np.empty(len(steps))
    comm.Allreduce(np.asarray(steps, dtype=float), steps_max, op=MPI.MAX)
    times = np.concatenate([[0.0], np.cumsum(steps_max)])
    if hasattr(opt, "destroy"):
        opt.destroy()
    if metric is not None:
        metric.destroy()
    energy.destroy()
    if comm.rank == 0 and rep >= 0:
        print(f"  repeat {rep + 1}/{args.repeats}  {method:<10} {len(steps):5d} its  "
              f"error {errors[-1]:.4e}  {times[-1]:7.2f} s  ({reason})", flush=True)
    return {"errors": errors, "rel_l2_errors": l2_errors, "times": times.tolist(),
            "setup_s": setup, "reason": reason, "params": u.num_params,
            "energy_identity_relerr": identity}


if comm.rank == 0:
    print(f"B2: Ritz/Poisson, P{args.degree} on {args.n}x{args.n}, MLP 2-{args.width}-1, "
          f"{comm.size} rank(s), {args.repeats} repeat(s)", flush=True)
for m in methods:  # warm-up (torch.func tracing, first PETSc solves): not recorded
    run(m, -1, n_iter=2)
raw = {m: [] for m in methods}
for rep in range(args.repeats):  # methods interleaved: load fluctuations hit all alike
    for m in methods:
        raw[m].append(run(m, rep))
torch.set_num_threads(threads_before)  # callers that run this file in-process keep theirs

finals = {m: raw[m][0]["errors"][-1] for m in methods}
best = min(finals.values())
thresholds = [c * best for c in factors]
rows = []
for m in methods:
    runs = raw[m]
    its = len(runs[0]["errors"]) - 1
    spread = max(abs(r["errors"][-1] - finals[m]) for r in runs) / max(finals[m], 1e-300)
    final_l2 = runs[0]["rel_l2_errors"][-1]
    total = median([r["times"][-1] for r in runs])
    row = {"method": m, "iterations": its, "params": runs[0]["params"],
           "error0": runs[0]["errors"][0], "final_error": finals[m], "final_rel_l2": final_l2,
           "repeat_spread": spread, "energy_identity_relerr": runs[0]["energy_identity_relerr"],
           "time_s": total, "time_per_it_ms": 1e3 * total / max(its, 1),
           "setup_s": median([r["setup_s"] for r in runs]), "reason": runs[0]["reason"],
           "frozen_from": frozen_from(runs[0]["errors"])}
    for j, thr in enumerate(thresholds):
        hits = [first_reach(r["errors"], r["times"], thr) for r in runs]
        row[f"its_{j}"] = hits[0][0]
        row[f"t_{j}"] = None if hits[0][0] is None else median([h[1] for h in hits])
    rows.append(row)

by = {r["method"]: r for r in rows}
speedups = []  # NG-energy against the baselines in time to each threshold
for j, thr in enumerate(thresholds):
    for other in ("Adam", "L-BFGS"):
        if NG not in by or other not in by:
            continue
        t_ng, t_o = by[NG][f"t_{j}"], by[other][f"t_{j}"]
        if t_ng is None or t_ng <= 0:  # NG never reaches it / it is above the start
            ratio = None
            kind = "NG-energy never reaches it" if t_ng is None else "above the initial error"
        elif t_o is None:  # lower bound: the baseline's whole run
            ratio, kind = by[other]["time_s"] / t_ng, "lower bound"
        else:
            ratio, kind = t_o / t_ng, "exact"
        speedups.append({"threshold": thr, "factor": factors[j], "against": other,
                         "speedup": ratio, "kind": kind})

columns = [("method", "method"), ("iterations", "its"), ("final_error", "final energy error"),
           ("final_rel_l2", "final rel L2 err"),
           ("time_s", "time [s]"), ("time_per_it_ms", "ms/it")]
for j, c in enumerate(factors):
    columns += [(f"its_{j}", f"its to {c:g}x"), (f"t_{j}", f"s to {c:g}x")]
columns.append(("repeat_spread", "repeat spread"))
table = print_table(
    f"\nB2: Ritz/Poisson, P{args.degree} on {args.n}x{args.n}, MLP 2-{args.width}-1 "
    f"({rows[0]['params']} params), {comm.size} rank(s), median of {args.repeats} repeat(s); "
    f"energy error ||u - u_h||_a vs the Galerkin solution u_h, initial "
    f"{rows[0]['error0']:.4g}; thresholds "
    + ", ".join(f"{c:g}x = {t:.3e}" for c, t in zip(factors, thresholds, strict=True))
    + f" (x best final error {best:.4e}); relative L2 error of u_h itself {galerkin_l2:.3e}",
    columns, rows)
if comm.rank == 0:
    for s in speedups:
        what = {"exact": f"{s['speedup']:.1f}x",
                "lower bound": f">{s['speedup']:.1f}x ({s['against']} never reaches it)",
                }.get(s["kind"], f"- ({s['kind']})") if s["speedup"] is not None else (
            f"- ({s['kind']})")
        print(f"speedup of NG-energy vs {s['against']:<6} in time to {s['factor']:g}x best "
              f"({s['threshold']:.3e}): {what}")
    for r in rows:
        if r["frozen_from"] is not None:
            print(f"note: {r['method']} makes no progress from iteration {r['frozen_from']} on "
                  "(the steps leave the parameters unchanged)")
    if any(r["repeat_spread"] > 1e-8 for r in rows):
        print("WARNING: final errors differ between repeats (see 'repeat spread')")
write_json(out, {"benchmark": "B2", "args": vars(args), "galerkin_energy": E_h,
                 "galerkin_rel_l2_error": galerkin_l2,
                 "thresholds": thresholds,
                 "best_final_error": best, "rows": rows, "speedups": speedups,
                 "table": table, "raw": raw})

if comm.rank == 0:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        errs = np.asarray(raw[m][0]["errors"])
        k = np.arange(1, errs.size)
        n_min = min(len(r["times"]) for r in raw[m])
        t = np.median(np.array([r["times"][:n_min] for r in raw[m]]), axis=0)
        errs, k = errs[:n_min], k[: n_min - 1]
        ax1.loglog(k, errs[1:], label=m)
        ax2.loglog(t[1:], errs[1:], label=m)
    for ax, xl in ((ax1, "iteration"), (ax2, "wall time [s]")):
        ax.axhline(rows[0]["error0"], color="0.6", ls=":", lw=1)
        for thr in thresholds:
            ax.axhline(thr, color="0.8", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("energy error ||u - u_h||_a")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend()
    fig.suptitle(f"B2: Ritz/Poisson, P{args.degree} {args.n}x{args.n}, MLP 2-{args.width}-1, "
                 f"{comm.size} rank(s)")
    fig.tight_layout()
    save_plot(fig, plot_path)
    plt.close(fig)
    print(f"wrote {out} and {plot_path}")
