# # Regression in H1: which Gram metric, and against Adam / L-BFGS
#
# Fit f(x, y) = |x - 0.4| sin(πy) (a kink along x = 0.4) by minimizing
# E(u) = 1/2 ||u - f||²_{H1} over a tanh network interpolated into P2. The natural
# gradient is run with G assembled in the H1 (ambient), L2 and Euclidean metrics,
# and compared with Adam and L-BFGS on the same energy and the same FE machinery.
#
#     mpirun -n 2 python demos/demo_regression.py --iterations 40
#
# Outputs in out_regression/: results.json, history.{json,csv} (H1 flow), errors.png
# (H1 error of every method vs iteration), fit.png and fields.bp (target and H1 fit).

import nngf_fem as nf  # noqa: I001

import argparse
import pathlib
import time

import numpy as np
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI

parser = argparse.ArgumentParser(description="H1 regression: metrics and baselines")
parser.add_argument("--n", type=int, default=16, help="cells per side")
parser.add_argument("--width", type=int, default=16)
parser.add_argument("--iterations", type=int, default=40, help="iterations of every method")
parser.add_argument("--adam-lr", type=float, default=1e-2)
parser.add_argument("--methods", default="H1,L2,Euclidean,Adam,LBFGS")
parser.add_argument("--expand", action="store_true",
                    help="also run the expansive H1 flow starting from 2 neurons")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="out_regression")
args = parser.parse_args()

comm = MPI.COMM_WORLD
msh = mesh.create_unit_square(comm, args.n, args.n)
x = ufl.SpatialCoordinate(msh)
f = abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1])


def run(method: str) -> dict:
    torch.manual_seed(args.seed)
    width = 2 if method == "H1-expand" else args.width
    u = nf.NeuralField(msh, nf.MLP(2, width=width, depth=1), element=("Lagrange", 2))
    energy = nf.RegressionEnergy(u, f, norm="H1", quadrature_degree=6)
    t0 = time.perf_counter()
    if method in ("H1", "L2", "Euclidean"):
        metric = {"H1": nf.H1, "L2": nf.L2, "Euclidean": nf.Euclidean}[method](u)
        solver = nf.NaturalGradientFlow(energy, metric, petsc_options_prefix=f"ng_{method}_")
        res = solver.run(args.iterations)
        metric.destroy()
    elif method == "H1-expand":
        metric = nf.H1(u)
        solver = nf.NaturalGradientFlow(energy, metric, petsc_options_prefix="ng_expand_")
        policy = nf.ExpansionPolicy(threshold=0.5, patience=2, neurons=2,
                                    max_params=4 * args.width + 1)
        res = nf.run_expansive(solver, policy, args.iterations)
        res.iterations = solver.iteration
        metric.destroy()
    else:
        opts = {"lr": args.adam_lr} if method == "Adam" else {}
        solver = nf.baselines.TorchOptimizerFlow(energy, method.lower(), **opts)
        res = solver.run(args.iterations)
    wall = time.perf_counter() - t0
    E = energy.value()
    if method == "H1":
        fits["H1"], fits["history"] = u.function, res.history
    return {"method": method, "h1_error": float(np.sqrt(2 * E)), "iterations": res.iterations,
            "params": u.num_params,
            "wall": wall, "energies": [h["energy"] for h in res.history]}


methods = args.methods.split(",") + (["H1-expand"] if args.expand else [])
fits: dict = {}
results = [run(m) for m in methods]
out = pathlib.Path(args.out)
table = [{k: r[k] for k in ("method", "h1_error", "iterations", "params", "wall")}
         for r in results]
nf.io.write_history(out, table, comm, name="results", meta={"args": vars(args), "results": results})
if "H1" in fits:
    f_h = fem.Function(fits["H1"].function_space, name="target")
    f_h.interpolate(fem.Expression(f, f_h.function_space.element.interpolation_points))
    fits["H1"].name = "u_H1"
    nf.io.write_history(out, fits["history"], comm)
    nf.io.write_fields(out / "fields.bp", [f_h, fits["H1"]])
    nf.io.plot_fields(out / "fit.png", [("target f", f_h), ("H1 natural gradient", fits["H1"])])
if comm.rank == 0:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.semilogy(np.sqrt(2 * np.maximum(r["energies"], 1e-300)), label=r["method"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("H1 error")
    ax.legend()
    fig.tight_layout()
    nf.io._save_png(fig, out / "errors.png")
    print(f"\nH1 regression of |x-0.4| sin(pi y), P2 on {args.n}x{args.n}, "
          f"network 2-{args.width}-1, "
          f"{comm.size} rank(s)")
    print(f"{'method':<12}{'H1 error':>12}{'iterations':>12}{'params':>8}{'wall [s]':>10}")
    for r in results:
        print(f"{r['method']:<12}{r['h1_error']:>12.4e}{r['iterations']:>12d}{r['params']:>8d}"
              f"{r['wall']:>10.2f}")
    print(f"outputs in {out}/: results.json, history.{{json,csv}}, errors.png, fit.png, "
          "fields.bp (ParaView)")
by = {r["method"]: r["h1_error"] for r in results}
if "H1" in by:
    e0 = float(np.sqrt(2 * nf.RegressionEnergy(
        nf.NeuralField(msh, nf.MLP(2, width=args.width, depth=1), element=("Lagrange", 2)),
        f, norm="H1").value()))
    assert by["H1"] < e0, "the H1 natural gradient flow did not reduce the error"
    for other in ("Euclidean", "Adam"):
        if other in by:
            assert by["H1"] <= by[other], (
                f"H1 Gram ({by['H1']:.3e}) behind {other} ({by[other]:.3e})")
