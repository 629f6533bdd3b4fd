"""B5: time per natural-gradient iteration on 1 and 2 MPI ranks, and agreement of results.

    python benchmarks/b5_mpi.py [--n 512] [--ranks 1,2] [--steps 3]

Launches itself under the venv's ``mpiexec -n R`` for each R (workers), on the Darcy
inversion of the flagship demo (benchmarks/_darcy.py; MLP 2-16-1, P1 n x n; 512 x 512 is
263k state dofs). Each worker runs --warmup iterations, then times --steps iterations
(median per iteration, also split into PDE solves, Riesz, NG Krylov and network), and
reports the final energy, k error and parameters. The table gives the speedup against
the first rank count and the largest parameter difference between the runs.
"""

import nngf_fem as nf  # noqa: I001

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from mpi4py import MPI

from _common import RESULTS, median, print_table, write_json
from _darcy import darcy

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=512, help="cells per side")
parser.add_argument("--width", type=int, default=16)
parser.add_argument("--ranks", default="1,2")
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--quick", action="store_true", help="smoke run (tiny mesh)")
parser.add_argument("--out", default=str(RESULTS / "b5_mpi.json"))
parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
args = parser.parse_args()
if args.quick:
    args.n, args.warmup, args.steps = 24, 1, 2


def worker(path: str) -> None:
    comm = MPI.COMM_WORLD
    prob = darcy(comm, args.n, width=args.width)
    flow = nf.NaturalGradientFlow(prob.energy, prob.metric, curvature="none", eps=1e-4,
                                  max_step=1e4,
                                  petsc_options={"ksp_rtol": 1e-12})
    flow.run(args.warmup)
    times, parts = [], {"t_pde": [], "t_riesz": [], "t_ng": [], "t_network": []}
    for _ in range(args.steps):
        comm.Barrier()
        rec = flow.step()
        comm.Barrier()
        times.append(comm.allreduce(rec["t_total"], op=MPI.MAX))
        for key in parts:
            parts[key].append(rec[key])
    res = {"ranks": comm.size, "dofs": prob.dofs, "params": prob.k.num_params,
           "it_s": median(times), "it_s_all": times,
           **{key: median(v) for key, v in parts.items()},
           "energy": flow.history[-1]["energy"], "k_error": prob.k_error(),
           "theta": prob.k.get_parameters().tolist(),
           "torch_threads": __import__("torch").get_num_threads()}
    flow.destroy()
    prob.destroy()
    if comm.rank == 0:
        pathlib.Path(path).write_text(json.dumps(res))


if args.worker:
    worker(args.worker)
    sys.exit(0)

if MPI.COMM_WORLD.size > 1:
    sys.exit("run b5_mpi.py without mpiexec: it launches its own 1- and 2-rank workers")
mpiexec = pathlib.Path(sys.executable).parent / "mpiexec"
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for r in map(int, args.ranks.split(",")):
        path = pathlib.Path(tmp) / f"r{r}.json"
        cmd = [str(mpiexec), "-n", str(r), sys.executable, __file__, "--worker", str(path),
               "--n", str(args.n), "--width", str(args.width), "--warmup", str(args.warmup),
               "--steps", str(args.steps)]
        subprocess.run(cmd, check=True)
        rows.append(json.loads(path.read_text()))
ref = rows[0]
for row in rows:
    row["speedup"] = ref["it_s"] / row["it_s"]
    row["max_theta_diff"] = float(np.max(np.abs(np.subtract(row["theta"], ref["theta"]))))
    row["energy_rel_diff"] = abs(row["energy"] - ref["energy"]) / abs(ref["energy"])
print_table(f"B5: Darcy natural gradient on {ref['dofs']:,} state dofs (MLP 2-{args.width}-1), "
            f"{args.warmup} warm-up + {args.steps} timed iterations (median; seconds)",
            [("ranks", "ranks"), ("it_s", "s / iteration"), ("speedup", "speedup"),
             ("t_pde", "PDE"), ("t_riesz", "Riesz"), ("t_ng", "NG Krylov"),
             ("t_network", "network"), ("energy", "final energy"),
             ("energy_rel_diff", "rel. energy diff"), ("max_theta_diff", "max theta diff")],
            rows)
write_json(args.out, {"benchmark": "B5", "args": vars(args), "rows": rows})
