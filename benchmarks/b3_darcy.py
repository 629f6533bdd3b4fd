"""B3: Darcy inversion with 1% noise -- natural gradient vs Adam/L-BFGS vs FE L-BFGS (TAO).

    mpirun -n 1 python benchmarks/b3_darcy.py [--n 32] [--repeats 3] [--quick]

The problem of ``demos/demo_darcy_inversion.py``: -div(k grad y) = 10, y = 0 on the
boundary of the unit square (P1, n x n), full-field state data with 1% noise,
E(k) = 1/2 ||y(k) - y_obs||^2 / ||y_obs||^2 + alpha/2 ||k - 1||_H1^2, alpha = 1e-7.
Methods (the Hilbert metric is ||k||^2 + l^2 ||grad k||^2, l = 0.1, everywhere):

1. expansive natural gradient from a 2-neuron network k = exp(N(x)) (H1 Gram matrix,
   ExpansionPolicy(threshold=0.5, patience=2, neurons=2), at most 24 neurons);
2. natural gradient, fixed width 2;  3. natural gradient, fixed width 24;
4. Adam and 5. L-BFGS (torch, strong Wolfe) on the width-24 network; Adam's learning
   rate is chosen among --adam-lrs on a 16x16 mesh (fewest PDE solves to the noise
   level, else lowest final misfit) unless --adam-lr is given;
6. the classical approach: k = exp(m), m in P1, TAO LMVM (L-BFGS) with the H1 metric as
   initial Hessian (J0^{-1} = Riesz map), same misfit and Tikhonov term, started from the
   coefficient of the initial 2-neuron network (the start of methods 1 and 2); for
   contrast also with J0 = I (Euclidean L-BFGS on the nodal values);
7. inexact Gauss-Newton-CG on the same FE coefficient (CG preconditioned by the H1 Riesz
   map, Eisenstat-Walker tolerances, Armijo), incremental forward/adjoint solves counted.

Per iteration: cumulative PDE solves (forward + adjoint [+ incremental], energy.counters), wall
time, relative L2 error of k, misfit. The noise level (Morozov's discrepancy principle,
as nf.discrepancy_stop): misfit <= 1.1 x the misfit of the noisy data against the
noise-free state. Every method runs its whole budget (no early stop), --repeats times;
trajectories are deterministic, timings are medians (1 torch and BLAS thread per rank by
default: with more, idle threads spin and slow these small problems). Writes JSON and a PNG.
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
from mpi4py import MPI

from _common import RESULTS, median, print_table, save_plot, write_json

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=32, help="cells per side")
parser.add_argument("--noise", type=float, default=0.01, help="relative noise level")
parser.add_argument("--alpha", type=float, default=1e-7, help="H1 Tikhonov weight")
parser.add_argument("--length-scale", type=float, default=0.1, help="l of the H1 metric")
parser.add_argument("--tau", type=float, default=1.1, help="discrepancy factor")
parser.add_argument("--ng-iterations", type=int, default=150)
parser.add_argument("--adam-iterations", type=int, default=1900,
                    help="Adam steps (2 PDE solves each; 1900 > 10x the NG solves)")
parser.add_argument("--lbfgs-iterations", type=int, default=150)
parser.add_argument("--fe-iterations", type=int, default=150)
parser.add_argument("--gn-iterations", type=int, default=15)
parser.add_argument("--max-width", type=int, default=24, help="large / maximal network width")
parser.add_argument("--adam-lr", type=float, default=None, help="skip tuning, use this lr")
parser.add_argument("--adam-lrs", default="1e-2,3e-2,1e-1", help="lrs tried at --tune-n")
parser.add_argument("--tune-n", type=int, default=16)
parser.add_argument("--tune-iterations", type=int, default=400)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads per rank (small problems: 1 is fastest; 0 = keep)")
parser.add_argument("--methods",
                    default="ng_expand,ng_small,ng_large,adam,lbfgs,fe_lmvm,fe_lmvm_euclid,"
                    "fe_gncg")
parser.add_argument("--quick", action="store_true", help="smoke run (small, few iterations)")
parser.add_argument("--out", default=str(RESULTS / "b3_darcy.json"))
parser.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
args = parser.parse_args()
if args.quick:
    args.n, args.tune_n, args.repeats = 12, 8, 1
    args.ng_iterations, args.adam_iterations, args.lbfgs_iterations = 15, 60, 10
    args.fe_iterations, args.tune_iterations, args.gn_iterations = 30, 30, 5
    args.adam_lrs = "1e-2,3e-2"

plot_path = pathlib.Path(args.plot) if args.plot else pathlib.Path(args.out).with_suffix(".png")
if args.threads > 0:
    import numpy.linalg  # noqa: F401  (load numpy's BLAS so that it can be limited too)

    torch.set_num_threads(args.threads)
    nf._backend.limit_blas_threads(args.threads)
comm = MPI.COMM_WORLD
LABELS = {"ng_expand": "NG expansive (2 neurons, grows to <= {w})", "ng_small": "NG fixed, width 2",
          "ng_large": "NG fixed, width {w}", "adam": "Adam, width {w} (lr {lr:g})",
          "lbfgs": "L-BFGS (torch), width {w}", "fe_lmvm": "FE P1 exp(m), TAO LMVM, J0 = H1",
          "fe_lmvm_euclid": "FE P1 exp(m), TAO LMVM, J0 = I (Euclidean)",
          "fe_gncg": "FE P1 exp(m), Gauss-Newton-CG, H1 precond."}


class Problem:
    """Mesh, state space, noisy data and the noise level of one Darcy inversion."""

    def __init__(self, n: int):
        self.msh = mesh.create_unit_square(comm, n, n)
        x = ufl.SpatialCoordinate(self.msh)
        self.k_true = ufl.exp(0.5 * ufl.sin(2 * ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
                              - 0.4 * ufl.exp(-((x[0] - 0.3) ** 2 + (x[1] - 0.7) ** 2) / 0.02))
        self.V = fem.functionspace(self.msh, ("Lagrange", 1))
        self.msh.topology.create_connectivity(1, 2)
        facets = mesh.exterior_facet_indices(self.msh.topology)
        self.bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(self.V, 1, facets), self.V)
        probe = nf.FEControl(self.V, transform="identity")  # k_true in P1, as every method
        kt = fem.Function(probe.space)
        kt.interpolate(fem.Expression(self.k_true, probe.space.element.interpolation_points))
        e = self.energy(probe, misfit_only=True)
        y_clean = nf.pde.synthetic_state(e, kt)
        e.destroy()
        self.y_obs = nf.add_noise(y_clean, args.noise, seed=args.seed)
        self.scale = 1.0 / self.assemble(self.y_obs**2 * ufl.dx)
        self.noise_misfit = 0.5 * self.scale * self.assemble((self.y_obs - y_clean) ** 2 * ufl.dx)
        self.k_norm = math.sqrt(self.assemble(self.k_true**2 * ufl.dx))
        self.dofs = self.V.dofmap.index_map.size_global

    def assemble(self, integrand) -> float:
        return comm.allreduce(fem.assemble_scalar(fem.form(integrand)))

    def energy(self, control, misfit_only: bool = False) -> nf.PDEConstrainedEnergy:
        """The reduced energy of ``control`` (a fresh state Function each time)."""
        y, v = fem.Function(self.V, name="y"), ufl.TestFunction(self.V)
        F = ufl.inner(control.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - 10.0 * v * ufl.dx
        if misfit_only:
            return nf.PDEConstrainedEnergy(F, y, [self.bc], control=control,
                                           misfit=0.5 * y**2 * ufl.dx)
        return nf.PDEConstrainedEnergy(
            F, y, [self.bc], control=control,
            misfit=0.5 * self.scale * (y - self.y_obs) ** 2 * ufl.dx,
            regularization=nf.Tikhonov(args.alpha, "H1", reference=1.0))


class Recorder:
    """Per-iteration trajectory: PDE solves, wall time, k error, misfit."""

    def __init__(self, problem: Problem, energy, control):
        self.energy, self.control = energy, control
        self.err_form = fem.form((control.ufl - problem.k_true) ** 2 * ufl.dx)
        self.k_norm = problem.k_norm
        self.rows: list[dict] = []
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def pde(self) -> int:
        c = self.energy.counters
        return sum(c.get(key, 0) for key in ("forward", "adjoint", "incremental_forward",
                                             "incremental_adjoint"))

    def record(self, misfit: float | None = None) -> dict:
        err = math.sqrt(comm.allreduce(fem.assemble_scalar(self.err_form))) / self.k_norm
        row = {"pde_solves": self.pde(), "wall": time.perf_counter() - self.t0,
               "cpu": time.process_time() - self.cpu0,
               "k_err": err, "n_params": self.control.num_params,
               "misfit": self.energy.misfit_value() if misfit is None else misfit}
        self.rows.append(row)
        return row


def network(problem: Problem, width: int, seed: int) -> nf.NeuralField:
    torch.manual_seed(seed)
    return nf.NeuralField(problem.msh, nf.MLP(2, width=width, depth=1), transform="exp",
                          name="k")


def run_ng(problem: Problem, width: int, iterations: int, expand: bool) -> Recorder:
    k = network(problem, width, args.seed)
    energy = problem.energy(k)
    metric = nf.H1(k, alpha=1.0, beta=args.length_scale**2)
    flow = nf.NaturalGradientFlow(energy, metric, eps=1e-4, max_step=1e4)
    policy = nf.ExpansionPolicy(threshold=0.5, patience=2, neurons=2,
                                max_params=4 * args.max_width + 1) if expand else None
    energy.value()
    rec = Recorder(problem, energy, k)
    rec.record()

    def monitor(fl, r):
        rec.record()
        if policy is not None and policy.should_expand(fl):
            policy.expand(fl)

    flow.run(iterations, callback=monitor)
    rec.extra = {"expansions": len(flow.expansions), "final_params": k.num_params,
                 "rejected_steps": sum(not h["accepted"] for h in flow.history
                                       if h.get("kind") is None)}
    flow.destroy()
    metric.destroy()
    energy.destroy()
    return rec


def run_torch(problem: Problem, name: str, iterations: int, lr: float | None = None) -> Recorder:
    k = network(problem, args.max_width, args.seed)
    energy = problem.energy(k)
    opt = nf.TorchOptimizerFlow(energy, name, **({} if lr is None else {"lr": lr}))
    energy.value()
    rec = Recorder(problem, energy, k)
    rec.record()
    for _ in range(iterations):
        r = opt.step()
        if not math.isfinite(r["energy"]):
            break
        rec.record()
    rec.extra = {"final_params": k.num_params, "evaluations": opt.evaluations}
    energy.destroy()
    return rec


def fe_control(problem: Problem) -> nf.FEControl:
    k = nf.FEControl(problem.V, transform="exp", name="k")
    k0 = fem.Function(k.space)  # start where the 2-neuron networks start
    k0.interpolate(network(problem, 2, args.seed).function)
    k.set_k(k0)
    return k


def run_fe(problem: Problem, iterations: int, euclidean: bool = False) -> Recorder:
    k = fe_control(problem)
    energy = problem.energy(k)
    if euclidean:  # J0 = I on the nodal values: a textbook L-BFGS, blind to the metric
        eye = nf.fe_inversion.h1_matrix(k.space)
        eye.zeroEntries()
        eye.shift(1.0)
        solver = nf.TaoSolver(energy, metric=eye, petsc_options_prefix="b3_tao_eucl_",
                              riesz_options={"ksp_type": "preonly", "pc_type": "jacobi"})
    else:
        solver = nf.TaoSolver(energy, alpha=1.0, beta=args.length_scale**2,
                              petsc_options_prefix="b3_tao_")
    rec = Recorder(problem, energy, k)

    def monitor(s, r):
        rec.record(misfit=r["misfit"])

    result = solver.run(iterations, callback=monitor)
    rec.extra = {"reason": result.reason, "converged": result.converged,
                 "evaluations": solver.evaluations, "final_params": k.num_params}
    solver.destroy()
    if euclidean:
        eye.destroy()
    energy.destroy()
    return rec


def run_gn(problem: Problem, iterations: int) -> Recorder:
    k = fe_control(problem)
    energy = problem.energy(k)
    solver = nf.GaussNewtonCG(energy, alpha=1.0, beta=args.length_scale**2,
                              petsc_options_prefix="b3_gncg_")
    rec = Recorder(problem, energy, k)

    def monitor(s, r):
        rec.record(misfit=r["misfit"])

    result = solver.run(iterations, callback=monitor)
    rec.extra = {"reason": result.reason, "converged": result.converged,
                 "cg_its": [h["cg_its"] for h in result.history],
                 "final_params": k.num_params}
    solver.destroy()
    energy.destroy()
    return rec


def summarize(rows: list[dict], noise_misfit: float) -> dict:
    """Noise-level crossing, best and final k error of one trajectory."""
    target = args.tau * noise_misfit
    hit = next((i for i, r in enumerate(rows) if r["misfit"] <= target), None)
    errs = [r["k_err"] for r in rows]
    out = {"iterations": len(rows) - 1, "final_k_err": errs[-1],
           "final_misfit_ratio": rows[-1]["misfit"] / noise_misfit,
           "best_misfit_ratio": min(r["misfit"] for r in rows) / noise_misfit,
           "final_cpu": rows[-1]["cpu"],
           "final_pde": rows[-1]["pde_solves"], "final_wall": rows[-1]["wall"],
           "best_k_err": min(errs), "best_k_err_pde": rows[int(np.argmin(errs))]["pde_solves"],
           "noise_it": hit, "noise_pde": None, "noise_wall": None, "noise_k_err": None}
    if hit is not None:
        out.update(noise_pde=rows[hit]["pde_solves"], noise_wall=rows[hit]["wall"],
                   noise_k_err=rows[hit]["k_err"])
    return out


def tune_adam() -> tuple[float, list[dict]]:
    """Pick Adam's learning rate on a coarse mesh (same budget rule as the benchmark)."""
    small = Problem(args.tune_n)
    trials = []
    for lr in map(float, args.adam_lrs.split(",")):
        s = summarize(run_torch(small, "adam", args.tune_iterations, lr).rows, small.noise_misfit)
        trials.append({"lr": lr, "noise_pde": s["noise_pde"],
                       "final_misfit_ratio": s["final_misfit_ratio"],
                       "best_misfit_ratio": s["best_misfit_ratio"],
                       "final_k_err": s["final_k_err"]})

    def key(t):
        reached = t["noise_pde"] is not None
        return (not reached, t["noise_pde"] if reached else 0, t["best_misfit_ratio"])

    return min(trials, key=key)["lr"], trials


t_start = time.perf_counter()
methods = args.methods.split(",")
for m in methods:
    if m not in LABELS:
        raise ValueError(f"method {m!r} is not known; allowed: {list(LABELS)}")
if "adam" in methods and args.adam_lr is None:
    t0 = time.perf_counter()
    adam_lr, tuning = tune_adam()
    t_tune = time.perf_counter() - t0
else:
    adam_lr, tuning, t_tune = (args.adam_lr if args.adam_lr is not None else 1e-2), [], 0.0
problem = Problem(args.n)
runners = {
    "ng_expand": lambda: run_ng(problem, 2, args.ng_iterations, expand=True),
    "ng_small": lambda: run_ng(problem, 2, args.ng_iterations, expand=False),
    "ng_large": lambda: run_ng(problem, args.max_width, args.ng_iterations, expand=False),
    "adam": lambda: run_torch(problem, "adam", args.adam_iterations, adam_lr),
    "lbfgs": lambda: run_torch(problem, "lbfgs", args.lbfgs_iterations),
    "fe_lmvm": lambda: run_fe(problem, args.fe_iterations),
    "fe_lmvm_euclid": lambda: run_fe(problem, args.fe_iterations, euclidean=True),
    "fe_gncg": lambda: run_gn(problem, args.gn_iterations),
}
budgets = {"ng_expand": args.ng_iterations, "ng_small": args.ng_iterations,
           "ng_large": args.ng_iterations, "adam": args.adam_iterations,
           "lbfgs": args.lbfgs_iterations, "fe_lmvm": args.fe_iterations,
           "fe_lmvm_euclid": args.fe_iterations,
           "fe_gncg": args.gn_iterations}
results: dict[str, dict] = {}
for m in methods:
    reps = []
    for _ in range(args.repeats):
        comm.Barrier()
        reps.append(runners[m]())
    first = reps[0].rows
    deterministic = all(
        len(r.rows) == len(first)
        and all(a["pde_solves"] == b["pde_solves"] and a["misfit"] == b["misfit"]
                for a, b in zip(r.rows, first, strict=True)) for r in reps)
    sums = [summarize(r.rows, problem.noise_misfit) for r in reps]
    s = dict(sums[0])
    for key in ("final_wall", "noise_wall", "final_cpu"):
        s[key] = median([x[key] for x in sums]) if s[key] is not None else None
        s[key + "_all"] = [x[key] for x in sums]
    walls = np.median(np.array([[row["wall"] for row in r.rows] for r in reps]), axis=0)
    results[m] = {
        "method": m, "label": LABELS[m].format(w=args.max_width, lr=adam_lr), **s,
        "deterministic": deterministic, "budget": budgets[m], **reps[0].extra,
        "trajectory": {"pde_solves": [r["pde_solves"] for r in first],
                       "wall_median": walls.tolist(), "k_err": [r["k_err"] for r in first],
                       "misfit": [r["misfit"] for r in first],
                       "n_params": [r["n_params"] for r in first]},
    }
    if comm.rank == 0:
        print(f"  {m}: {s['iterations']} its, {s['final_pde']} PDE solves, "
              f"{s['final_wall']:.1f} s, k err {s['final_k_err']:.4f}", flush=True)

rows = list(results.values())
print_table(
    f"B3: Darcy inversion, P1 {args.n}x{args.n} ({problem.dofs} dofs), noise {args.noise:g}, "
    f"alpha {args.alpha:g}, {comm.size} rank(s), median of {args.repeats}; noise level = "
    f"misfit <= {args.tau:g} x {problem.noise_misfit:.3e}",
    [("label", "method"), ("iterations", "its"), ("final_params", "unknowns"),
     ("noise_pde", "PDE solves to noise"), ("noise_wall", "time to noise [s]"),
     ("noise_k_err", "k err at noise"), ("best_k_err", "best k err"),
     ("final_k_err", "final k err"), ("final_misfit_ratio", "final misfit / noise"),
     ("best_misfit_ratio", "best misfit / noise"),
     ("final_pde", "PDE solves"), ("final_wall", "time [s]"), ("final_cpu", "CPU [s]")], rows)

ratio_text = "-"
if "adam" in results and "ng_expand" in results:
    ng, adam = results["ng_expand"]["noise_pde"], results["adam"]
    if ng is None:
        ratio_text = "undefined (expansive NG did not reach the noise level)"
    elif adam["noise_pde"] is not None:
        ratio_text = f"{adam['noise_pde'] / ng:.1f}"
    else:
        ratio_text = f">= {adam['final_pde'] / ng:.1f} (Adam did not reach it in its budget)"
fe_text = "-"
if "fe_lmvm" in results and "ng_expand" in results:
    ng, fe = results["ng_expand"]["noise_pde"], results["fe_lmvm"]["noise_pde"]
    if ng is not None and fe is not None:
        fe_text = f"{ng / fe:.2f}"
total = time.perf_counter() - t_start
if comm.rank == 0:
    print(f"\nAdam lr {adam_lr:g} (tuned on {args.tune_n}x{args.tune_n} over {args.adam_lrs}: "
          + ", ".join(f"{t['lr']:g} -> {t['noise_pde']} PDE solves to noise, best misfit "
                      f"{t['best_misfit_ratio']:.2f}x" for t in tuning) + f"; {t_tune:.1f} s)")
    print(f"PDE solves to the noise level, Adam / expansive NG: {ratio_text} (target >= 10)")
    print(f"PDE solves to the noise level, expansive NG / FE TAO LMVM: {fe_text}")
    print(f"total wall time {total:.1f} s")

write_json(args.out, {"benchmark": "B3", "args": vars(args), "dofs": problem.dofs,
                      "noise_misfit": problem.noise_misfit, "adam_lr": adam_lr,
                      "adam_tuning": tuning, "adam_tuning_s": t_tune,
                      "ratio_adam_over_ng_expand": ratio_text,
                      "ratio_ng_expand_over_fe": fe_text, "total_s": total, "rows": rows})

if comm.rank == 0:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for r in rows:
        tr = r["trajectory"]
        pde = np.maximum(np.array(tr["pde_solves"], dtype=float), 1.0)
        wall = np.maximum(np.array(tr["wall_median"]), 1e-3)
        style = {"marker": "o", "ms": 2.5} if len(pde) <= 40 else {}
        for col, xs in enumerate((pde, wall)):
            axes[0, col].loglog(xs, tr["k_err"], label=r["label"], **style)
            axes[1, col].loglog(xs, np.array(tr["misfit"]) / problem.noise_misfit, **style)
    for col, xl in enumerate(("PDE solves (forward + adjoint + incremental)",
                               "wall time [s]")):
        axes[1, col].axhline(args.tau, color="k", ls="--", lw=0.8)
        axes[1, col].set_xlabel(xl)
    axes[0, 0].set_ylabel("relative L2 error of k")
    axes[1, 0].set_ylabel(f"misfit / noise level ({args.tau:g}: dashed)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"B3 Darcy inversion, P1 {args.n}x{args.n}, noise {args.noise:g}, "
                 f"{comm.size} rank(s)")
    fig.tight_layout()
    save_plot(fig, plot_path)
    print(f"wrote {args.out} and {plot_path}")
comm.Barrier()
