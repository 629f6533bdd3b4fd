"""B3: Darcy inversion with 1% noise -- natural gradient vs Adam/L-BFGS vs FE L-BFGS (TAO).

    python benchmarks/b3_darcy.py [--n 32] [--repeats 3] [--quick]
    python benchmarks/b3_darcy.py --mesh-study [--sizes 32,64,128] [--repeats 1]

The problem of ``demos/demo_darcy_inversion.py``: -div(k grad y) = 10, y = 0 on the
boundary of the unit square (P1, n x n), full-field state data with 1% noise,
E(k) = 1/2 ||y(k) - y_obs||^2 / ||y_obs||^2 + alpha/2 ||k - 1||_H1^2, alpha = 1e-7.
Methods (the Hilbert metric is ||k||^2 + l^2 ||grad k||^2, l = 0.1, everywhere):

1. expansive natural gradient from a 2-neuron network k = exp(N(x)) with the flow's
   default curvature (``curvature="auto"``: a Gauss-Newton variant for a PDE energy; the
   label names the one used), growth by
   ``expansion=ExpansionPolicy(threshold=0.5, patience=2, neurons=2)``, at most
   --max-width neurons; the same with ``curvature="none"`` (the paper's first-order flow);
2. natural gradient, fixed width 2;  3. natural gradient, fixed width --max-width;
4. Adam and 5. L-BFGS (torch, strong Wolfe) on the width---max-width network; Adam's
   learning rate is chosen among --adam-lrs on a 16x16 mesh (fewest PDE solves to the
   noise level, else lowest final misfit) unless --adam-lr is given;
6. the classical approach: k = exp(m), m in P1, TAO LMVM (L-BFGS) with the H1 metric as
   initial Hessian (J0^{-1} = Riesz map), same misfit and Tikhonov term, started from the
   coefficient of the initial 2-neuron network (the start of methods 1 and 2); for
   contrast also with J0 = I (Euclidean L-BFGS on the nodal values);
7. inexact Gauss-Newton-CG on the same FE coefficient (CG preconditioned by the H1 Riesz
   map, Eisenstat-Walker tolerances, Armijo).

No step size is set for the natural-gradient flows (no ``max_step``, default damping).

"PDE solves" = ``energy.pde_solves``: forward + adjoint solves + incremental
(Gauss-Newton) pairs -- one incremental forward and one incremental adjoint solve that
reuse a factorization count as one. Factorizations (``energy.counters``) and
back-substitutions (every triangular solve pair with a factorization: forward,
adjoint, each incremental solve) are reported as well. Wall times exclude the
benchmark's own recording (k error assembly). The noise level (Morozov's discrepancy
principle, as nf.discrepancy_stop): misfit <= --tau x the misfit of the noisy data
against the noise-free state.

Main table: every method runs its whole budget (no early stop), --repeats times;
trajectories are deterministic, timings are medians.

``--mesh-study``: at every size of --sizes, TAO LMVM (J0 = H1 Riesz map), FE
Gauss-Newton-CG and the network flows with the flow's default curvature -- (a)
``ng_expand``: expansive from width 2 (``ExpansionPolicy(max_params=4*24+1)``, otherwise
the default policy), (b) ``ng_fixed``: fixed width 16, (c) ``ng_fo_expand``: the
first-order flow (``curvature="none"``), expansive as (a); optional ``ng_gn_expand``
(``curvature="gauss-newton"``) and ``ng_lbfgs_expand`` -- each *stopped* at the noise
level (network runs capped at --study-iterations, the first-order flow at
--fo-iterations). Reported at the stop: PDE solves,
factorizations, back-substitutions, wall time, k error, and the ratios to LMVM.

1 torch and BLAS thread per rank by default (with more, idle threads spin and slow these
small problems). Writes JSON and (main table) a PNG.
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

from _common import (
    choices,
    RESULTS,
    median,
    print_table,
    flow_summary,
    save_plot,
    smooth_truth,
    write_json,
    zero_boundary_condition,
)

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
                    default="ng_expand,ng_expand_fo,ng_small,ng_large,adam,lbfgs,fe_lmvm,"
                    "fe_lmvm_euclid,fe_gncg")
parser.add_argument("--mesh-study", action="store_true",
                    help="mesh-independence table instead of the main table (runs stop at "
                    "the noise level)")
parser.add_argument("--sizes", default="32,64,128", help="mesh study: cells per side")
parser.add_argument("--study-methods",
                    default="fe_lmvm,fe_gncg,ng_expand,ng_fixed,ng_fo_expand",
                    help="mesh study: methods (ng_expand/ng_fixed: the flow's default "
                    "curvature; also ng_gn_expand (curvature='gauss-newton') and "
                    "ng_lbfgs_expand)")
parser.add_argument("--study-iterations", type=int, default=60,
                    help="mesh study: cap of the Gauss-Newton network runs")
parser.add_argument("--fo-iterations", type=int, default=150,
                    help="mesh study: cap of the first-order network run")
parser.add_argument("--study-width", type=int, default=16, help="mesh study: fixed width")
parser.add_argument("--fit-iterations", type=int, default=None,
                    help="network fit iterations of a projected step (default: the flow's)")
parser.add_argument("--quick", action="store_true", help="smoke run (small, few iterations)")
parser.add_argument("--out", default=None,
                    help="JSON path (default results/b3_darcy.json, with --mesh-study "
                    "results/b3_darcy_mesh.json)")
parser.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
args = parser.parse_args()
if args.out is None:
    args.out = str(RESULTS / ("b3_darcy_mesh.json" if args.mesh_study else "b3_darcy.json"))
if args.quick:
    args.n, args.tune_n, args.repeats = 12, 8, 1
    args.ng_iterations, args.adam_iterations, args.lbfgs_iterations = 15, 60, 10
    args.fe_iterations, args.tune_iterations, args.gn_iterations = 30, 30, 5
    args.adam_lrs = "1e-2,3e-2"
    args.sizes, args.study_iterations, args.fo_iterations = "8,12", 15, 15

plot_path = pathlib.Path(args.plot) if args.plot else pathlib.Path(args.out).with_suffix(".png")
if args.threads > 0:
    import numpy.linalg  # noqa: F401  (load numpy's BLAS so that it can be limited too)

    torch.set_num_threads(args.threads)
    nf._backend.limit_blas_threads(args.threads)
comm = MPI.COMM_WORLD
LABELS = {"ng_expand": "NG expansive (2 neurons, grows to <= {w})",
          "ng_expand_fo": "NG first-order expansive (2 neurons, grows to <= {w})",
          "ng_small": "NG fixed, width 2",
          "ng_large": "NG fixed, width {w}", "adam": "Adam, width {w} (lr {lr:g})",
          "lbfgs": "L-BFGS (torch), width {w}", "fe_lmvm": "FE P1 exp(m), TAO LMVM, J0 = H1",
          "fe_lmvm_euclid": "FE P1 exp(m), TAO LMVM, J0 = I (Euclidean)",
          "fe_gncg": "FE P1 exp(m), Gauss-Newton-CG, H1 precond."}
STUDY_LABELS = {"fe_lmvm": "FE TAO LMVM, J0 = H1 Riesz", "fe_gncg": "FE Gauss-Newton-CG",
                "ng_expand": "NG default flow ({c}), expansive (2 -> <= 24 neurons)",
                "ng_fixed": "NG default flow ({c}), fixed width {w}",
                "ng_fo_expand": "NG first-order ({c}), expansive (2 -> <= 24 neurons)",
                "ng_gn_expand": "NG tangent GN ({c}), expansive (2 -> <= 24 neurons)",
                "ng_lbfgs_expand": "NG L-BFGS curvature ({c}), expansive (2 -> <= 24 neurons)"}


class Problem:
    """Mesh, state space, noisy data and the noise level of one Darcy inversion."""

    def __init__(self, n: int):
        self.msh = mesh.create_unit_square(comm, n, n)
        x = ufl.SpatialCoordinate(self.msh)
        self.k_true = smooth_truth(x)
        self.V = fem.functionspace(self.msh, ("Lagrange", 1))
        self.bc = zero_boundary_condition(self.V)
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
    """Per-iteration trajectory: PDE solves, factorizations, wall time, k error, misfit.

    The time spent here (assembling the k error) is left out of the wall times.
    ``stop_at`` (a misfit level) makes :meth:`record` return True once it is reached.
    """

    def __init__(self, problem: Problem, energy, control, stop_at: float | None = None):
        self.energy, self.control = energy, control
        self.err_form = fem.form((control.ufl - problem.k_true) ** 2 * ufl.dx)
        self.k_norm = problem.k_norm
        self.stop_at = stop_at
        self.rows: list[dict] = []
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.overhead = self.cpu_overhead = 0.0

    def record(self, misfit: float | None = None) -> bool:
        t, cpu = time.perf_counter(), time.process_time()
        err = math.sqrt(comm.allreduce(fem.assemble_scalar(self.err_form))) / self.k_norm
        c = self.energy.counters
        row = {"pde_solves": self.energy.pde_solves, "forward": c["forward"],
               "adjoint": c["adjoint"], "incremental": c.get("incremental", 0),
               "factorizations": c.get("factorizations"),
               "back_substitutions": c.get("back_substitutions"),
               "wall": t - self.t0 - self.overhead, "cpu": cpu - self.cpu0 - self.cpu_overhead,
               "k_err": err, "n_params": self.control.num_params,
               "misfit": self.energy.misfit_value() if misfit is None else misfit}
        self.rows.append(row)
        self.overhead += time.perf_counter() - t
        self.cpu_overhead += time.process_time() - cpu
        return self.stop_at is not None and row["misfit"] <= self.stop_at


def network(problem: Problem, width: int, seed: int) -> nf.NeuralField:
    torch.manual_seed(seed)
    return nf.NeuralField(problem.msh, nf.MLP(2, width=width, depth=1), transform="exp",
                          name="k")


def run_ng(problem: Problem, width: int, iterations: int, expand: bool,
           curvature: str = "auto", policy: dict | None = None,
           stop_at: float | None = None) -> Recorder:
    """A natural-gradient flow with the flow's defaults (no step size, no damping set)."""
    k = network(problem, width, args.seed)
    energy = problem.energy(k)
    metric = nf.H1(k, alpha=1.0, beta=args.length_scale**2)
    policy = nf.ExpansionPolicy(**(policy or {})) if expand else None
    extra = {} if args.fit_iterations is None else {"fit_iterations": args.fit_iterations}
    flow = nf.NaturalGradientFlow(energy, metric, curvature=curvature, expansion=policy,
                                  **extra)
    rec = Recorder(problem, energy, k, stop_at)
    energy.value()  # the flow's first evaluation (cached: counted once)
    rec.record()

    def monitor(fl, r):
        return rec.record()

    result = flow.run(iterations, callback=monitor)
    rec.extra = {**flow_summary(flow, result), "final_params": k.num_params}
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


def run_fe(problem: Problem, iterations: int, euclidean: bool = False,
           stop_at: float | None = None) -> Recorder:
    k = fe_control(problem)
    energy = problem.energy(k)
    if euclidean:  # J0 = I on the nodal values: a textbook L-BFGS, blind to the metric
        eye = nf.Euclidean(k)
        solver = nf.TaoSolver(energy, metric=eye, petsc_options_prefix="b3_tao_eucl_")
    else:
        solver = nf.TaoSolver(energy, alpha=1.0, beta=args.length_scale**2,
                              petsc_options_prefix="b3_tao_")
    rec = Recorder(problem, energy, k, stop_at)

    def monitor(s, r):
        return rec.record(misfit=r["misfit"])

    result = solver.run(iterations, callback=monitor)
    rec.extra = {"reason": result.reason, "converged": result.converged,
                 "evaluations": solver.evaluations, "final_params": k.num_params}
    solver.destroy()
    if euclidean:
        eye.destroy()
    energy.destroy()
    return rec


def run_gn(problem: Problem, iterations: int, stop_at: float | None = None) -> Recorder:
    k = fe_control(problem)
    energy = problem.energy(k)
    solver = nf.GaussNewtonCG(energy, alpha=1.0, beta=args.length_scale**2,
                              petsc_options_prefix="b3_gncg_")
    rec = Recorder(problem, energy, k, stop_at)

    def monitor(s, r):
        return rec.record(misfit=r["misfit"])

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
           "final_factorizations": rows[-1]["factorizations"],
           "best_k_err": min(errs), "best_k_err_pde": rows[int(np.argmin(errs))]["pde_solves"],
           "noise_it": hit, "noise_pde": None, "noise_wall": None, "noise_k_err": None,
           "noise_factorizations": None}
    if hit is not None:
        out.update(noise_pde=rows[hit]["pde_solves"], noise_wall=rows[hit]["wall"],
                   noise_k_err=rows[hit]["k_err"],
                   noise_factorizations=rows[hit]["factorizations"])
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


def main_table() -> None:
    """The B3 table: every method runs its whole budget."""
    policy = {"threshold": 0.5, "patience": 2, "neurons": 2,
              "max_params": 4 * args.max_width + 1}
    t_start = time.perf_counter()
    methods = choices(args.methods, LABELS)
    if "adam" in methods and args.adam_lr is None:
        t0 = time.perf_counter()
        adam_lr, tuning = tune_adam()
        t_tune = time.perf_counter() - t0
    else:
        adam_lr, tuning, t_tune = (args.adam_lr if args.adam_lr is not None else 1e-2), [], 0.0
    problem = Problem(args.n)
    runners = {
        "ng_expand": lambda: run_ng(problem, 2, args.ng_iterations, expand=True, policy=policy),
        "ng_expand_fo": lambda: run_ng(problem, 2, args.ng_iterations, expand=True,
                                       curvature="none", policy=policy),
        "ng_small": lambda: run_ng(problem, 2, args.ng_iterations, expand=False),
        "ng_large": lambda: run_ng(problem, args.max_width, args.ng_iterations, expand=False),
        "adam": lambda: run_torch(problem, "adam", args.adam_iterations, adam_lr),
        "lbfgs": lambda: run_torch(problem, "lbfgs", args.lbfgs_iterations),
        "fe_lmvm": lambda: run_fe(problem, args.fe_iterations),
        "fe_lmvm_euclid": lambda: run_fe(problem, args.fe_iterations, euclidean=True),
        "fe_gncg": lambda: run_gn(problem, args.gn_iterations),
    }
    budgets = {"ng_expand": args.ng_iterations, "ng_expand_fo": args.ng_iterations,
               "ng_small": args.ng_iterations,
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
            "method": m, "label": LABELS[m].format(w=args.max_width, lr=adam_lr)
            + (f" [{reps[0].extra['curvature']}]" if "curvature" in reps[0].extra else ""), **s,
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
         ("noise_pde", "PDE solves to noise"), ("noise_factorizations", "fact. to noise"),
         ("noise_wall", "time to noise [s]"),
         ("noise_k_err", "k err at noise"), ("best_k_err", "best k err"),
         ("final_k_err", "final k err"), ("final_misfit_ratio", "final misfit / noise"),
         ("best_misfit_ratio", "best misfit / noise"),
         ("final_pde", "PDE solves"), ("final_factorizations", "fact."),
         ("final_wall", "time [s]"), ("final_cpu", "CPU [s]")], rows)

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


def run_study(m: str, problem: Problem, cap: int, policy: dict, target: float) -> Recorder:
    """One mesh-study run, stopped at the misfit ``target`` or after ``cap`` iterations."""
    if m == "fe_lmvm":
        return run_fe(problem, cap, stop_at=target)
    if m == "fe_gncg":
        return run_gn(problem, cap, stop_at=target)
    if m == "ng_fixed":
        return run_ng(problem, args.study_width, cap, False, stop_at=target)
    curvature = {"ng_expand": "auto", "ng_gn_expand": "gauss-newton",
                 "ng_lbfgs_expand": "lbfgs", "ng_fo_expand": "none"}[m]
    return run_ng(problem, 2, cap, True, curvature=curvature, policy=policy, stop_at=target)


def mesh_study() -> None:
    """Mesh-independence table: every method stops at the noise level (or its cap)."""
    t_start = time.perf_counter()
    sizes = [int(v) for v in args.sizes.split(",")]
    methods = choices(args.study_methods, STUDY_LABELS)
    policy = {"max_params": 4 * 24 + 1}  # otherwise the default ExpansionPolicy
    caps = {"fe_lmvm": args.fe_iterations, "fe_gncg": args.gn_iterations,
            "ng_expand": args.study_iterations, "ng_fixed": args.study_iterations,
            "ng_gn_expand": args.study_iterations,
            "ng_lbfgs_expand": args.study_iterations, "ng_fo_expand": args.fo_iterations}
    rows: list[dict] = []
    for n in sizes:
        problem = Problem(n)
        target = args.tau * problem.noise_misfit
        for m in methods:
            reps = []
            for _ in range(args.repeats):
                comm.Barrier()
                reps.append(run_study(m, problem, caps[m], policy, target))
            last = reps[0].rows[-1]
            reached = last["misfit"] <= target
            deterministic = all(
                [(r["pde_solves"], r["misfit"]) for r in rep.rows]
                == [(r["pde_solves"], r["misfit"]) for r in reps[0].rows] for rep in reps)
            row = {"n": n, "dofs": problem.dofs, "method": m,
                   "label": STUDY_LABELS[m].format(
                       w=args.study_width, c=getattr(reps[0], "extra", {}).get("curvature", "-")),
                   "reached": reached, "cap": caps[m], "iterations": len(reps[0].rows) - 1,
                   "stop": "noise level" if reached
                   else f"cap, misfit {last['misfit'] / problem.noise_misfit:.2f}x noise",
                   "misfit_ratio": last["misfit"] / problem.noise_misfit,
                   "pde_solves": last["pde_solves"], "forward": last["forward"],
                   "adjoint": last["adjoint"], "incremental": last["incremental"],
                   "factorizations": last["factorizations"],
                   "back_substitutions": last["back_substitutions"],
                   "wall": median([rep.rows[-1]["wall"] for rep in reps]),
                   "wall_all": [rep.rows[-1]["wall"] for rep in reps],
                   "cpu": median([rep.rows[-1]["cpu"] for rep in reps]),
                   "k_err": last["k_err"], "n_params": last["n_params"],
                   "deterministic": deterministic, **reps[0].extra,
                   "trajectory": {key: [r[key] for r in reps[0].rows]
                                  for key in ("pde_solves", "misfit", "k_err", "n_params",
                                              "factorizations")}}
            for key in ("pde_solves", "factorizations", "back_substitutions", "wall",
                        "k_err"):
                row[f"{key}_to_noise"] = row[key] if reached else None
            rows.append(row)
            if comm.rank == 0:
                print(f"  n={n} {m}: {row['stop']}, {row['iterations']} its, "
                      f"{row['pde_solves']} PDE solves, {row['wall']:.2f} s, "
                      f"k err {row['k_err']:.4f}", flush=True)
    # ratios to LMVM at the same size
    for r in rows:
        ref = next((x for x in rows if x["n"] == r["n"] and x["method"] == "fe_lmvm"), None)
        for key in ("pde_solves", "wall", "k_err"):
            ok = ref is not None and r["reached"] and ref["reached"]
            r[f"{key}_vs_lmvm"] = r[key] / ref[key] if ok and ref[key] else None
    print_table(
        f"B3 mesh study: Darcy inversion, P1 n x n, noise {args.noise:g}, alpha {args.alpha:g}, "
        f"{comm.size} rank(s), runs stopped at misfit <= {args.tau:g} x noise misfit; "
        f"median wall time of {args.repeats}",
        [("n", "n"), ("dofs", "dofs"), ("label", "method"), ("stop", "stop"),
         ("iterations", "its"), ("n_params", "unknowns"),
         ("pde_solves_to_noise", "PDE solves to noise"),
         ("factorizations_to_noise", "factorizations"),
         ("back_substitutions_to_noise", "back-subst."),
         ("wall_to_noise", "time to noise [s]"), ("k_err_to_noise", "k err at noise"),
         ("pde_solves_vs_lmvm", "solves / LMVM"), ("wall_vs_lmvm", "time / LMVM"),
         ("k_err_vs_lmvm", "k err / LMVM"), ("pde_solves", "PDE solves (all)"),
         ("wall", "time (all) [s]")], rows)
    growth = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        lo, hi = mine[0], mine[-1]
        growth.append({"method": m, "label": lo["label"], "n_lo": lo["n"], "n_hi": hi["n"],
                       "pde_lo": lo["pde_solves_to_noise"], "pde_hi": hi["pde_solves_to_noise"],
                       "growth": hi["pde_solves_to_noise"] / lo["pde_solves_to_noise"]
                       if lo["reached"] and hi["reached"] and len(sizes) > 1 else None})
    if comm.rank == 0:
        print()
    print_table(f"PDE solves to the noise level, n = {sizes[-1]} over n = {sizes[0]}",
                [("label", "method"), ("pde_lo", f"n = {sizes[0]}"),
                 ("pde_hi", f"n = {sizes[-1]}"), ("growth", "growth")], growth)
    # the criteria of issue 13, as measured (not tuned for)
    ng = [m for m in methods if m.startswith("ng_") and m != "ng_fo_expand"]
    criteria = {}
    if "fe_lmvm" in methods and ng:
        for m in ng:
            mine = [r for r in rows if r["method"] == m]
            criteria[m] = {
                "reached_every_size": all(r["reached"] for r in mine),
                "solves_le_1.5x_lmvm": all(r["pde_solves_vs_lmvm"] is not None
                                           and r["pde_solves_vs_lmvm"] <= 1.5 for r in mine),
                "k_err_le_lmvm": all(r["k_err_vs_lmvm"] is not None
                                     and r["k_err_vs_lmvm"] <= 1.0 for r in mine),
                "wall_le_2x_lmvm": all(r["wall_vs_lmvm"] is not None
                                       and r["wall_vs_lmvm"] <= 2.0 for r in mine),
                "growth_le_1.5": next((g["growth"] is not None and g["growth"] <= 1.5
                                       for g in growth if g["method"] == m), False),
            }
    total = time.perf_counter() - t_start
    if comm.rank == 0:
        print("\nissue 13 criteria per network method (measured, yes/no):")
        for m, c in criteria.items():
            print(f"  {m}: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in c.items()))
        print(f"total wall time {total:.1f} s")
    write_json(args.out, {"benchmark": "B3-mesh", "args": vars(args), "sizes": sizes,
                          "criteria": criteria, "growth": growth, "total_s": total,
                          "rows": rows})
    if comm.rank == 0:
        print(f"wrote {args.out}")


if args.mesh_study:
    mesh_study()
else:
    main_table()
