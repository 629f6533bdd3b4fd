"""B4: where the time of one natural-gradient iteration goes, at 16k, 66k and 260k dofs.

    mpirun -n 1 python benchmarks/b4_cost_split.py [--sizes 128,256,512] [--steps 3]

The Darcy inversion of the flagship demo (benchmarks/_darcy.py; k = exp(N), MLP 2-16-1,
H1 metric with l = 0.1) on P1 n x n meshes. After --warmup iterations, --steps
iterations are timed piece by piece and the medians reported:

* forward: one state solve (assembly + MUMPS LU), per solve; the line search may
  solve several times per iteration (column "fwd/it");
* adjoint: one adjoint solve (the transpose of the forward LU for this linear problem);
* Riesz: the exact H1 gradient g = A_H^{-1} e (CG + GAMG) for the alignment;
* NG Krylov: the natural-gradient solve (Nystrom sketch + CG; iterations);
* network: Jacobian J (linearization), b = J^T e and the network evaluations of the
  line search.

ratio = (Riesz + NG Krylov + network) / (forward + adjoint), the natural-gradient
overhead per iteration relative to one forward and one adjoint solve.
"""

import nngf_fem as nf  # noqa: I001

import argparse

from mpi4py import MPI

from _common import RESULTS, median, print_table, write_json
from _darcy import darcy

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--sizes", default="128,256,512", help="cells per side")
parser.add_argument("--width", type=int, default=16)
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--steps", type=int, default=3, help="timed iterations (medians)")
parser.add_argument("--quick", action="store_true", help="smoke run (tiny sizes)")
parser.add_argument("--out", default=str(RESULTS / "b4_cost_split.json"))
args = parser.parse_args()
if args.quick:
    args.sizes, args.warmup, args.steps = "16,24", 1, 1

comm = MPI.COMM_WORLD
rows = []
for n in map(int, args.sizes.split(",")):
    prob = darcy(comm, n, width=args.width)
    energy, k = prob.energy, prob.k
    flow = nf.NaturalGradientFlow(energy, prob.metric, curvature="none", eps=1e-4, max_step=1e4,
                                  petsc_options_prefix=f"b4_{n}_")
    flow.run(args.warmup)
    steps = []
    for _ in range(args.steps):
        t0, c0, e0 = dict(energy.timings), dict(energy.counters), k.eval_seconds
        comm.Barrier()
        rec = flow.step()
        comm.Barrier()
        nf_, na = (energy.counters[s] - c0[s] for s in ("forward", "adjoint"))
        fwd = (energy.timings["forward"] - t0["forward"]) / max(nf_, 1)
        adj = (energy.timings["adjoint"] - t0["adjoint"]) / max(na, 1)
        network = rec["t_network"] + (k.eval_seconds - e0)
        overhead = rec["t_riesz"] + rec["t_ng"] + network
        steps.append({"forward": fwd, "adjoint": adj, "forward_per_it": nf_,
                      "riesz": rec["t_riesz"], "riesz_its": rec["riesz_its"],
                      "ng": rec["t_ng"], "sketch": rec["t_sketch"], "ng_its": rec["ksp_its"],
                      "network": network, "iteration": rec["t_total"],
                      "ratio": overhead / (fwd + adj)})
    row = {"n": n, "dofs": prob.dofs, "params": k.num_params, "ranks": comm.size,
           "steps": steps, "k_error": prob.k_error()}
    for key in steps[0]:
        row[key] = median([s[key] for s in steps])
    rows.append(row)
    flow.destroy()
    prob.destroy()

print_table(f"B4: cost of one natural-gradient iteration (Darcy, MLP 2-{args.width}-1, "
            f"{comm.size} rank(s); medians of {args.steps} iterations; seconds)",
            [("dofs", "state dofs"), ("forward", "forward"), ("adjoint", "adjoint"),
             ("forward_per_it", "fwd/it"), ("riesz", "Riesz"), ("riesz_its", "Riesz its"),
             ("ng", "NG Krylov"), ("sketch", "of it sketch"), ("ng_its", "CG its"),
             ("network", "network"), ("iteration", "iteration"),
             ("ratio", "overhead / (fwd+adj)")], rows)
write_json(args.out, {"benchmark": "B4", "args": vars(args), "rows": rows})
