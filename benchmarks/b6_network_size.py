"""B6: time and memory of one matrix-free natural-gradient solve vs network size.

    mpirun -n 1 python benchmarks/b6_network_size.py [--n 64] [--repeats 3]

H1 regression on a P1 mesh; MLP(2, width, depth=2) with about 1k, 10k and 100k
parameters; one direction (G + eps I) d = -b by PETSc CG with the Nystrom
preconditioner. Reports median wall time of the solve, CG iterations, peak RSS, and
the memory a dense Gram matrix would need (8 P^2 bytes). Writes JSON.
"""

import nngf_fem as nf  # noqa: I001

import argparse
import resource
import statistics
import time

import torch
import ufl
from dolfinx import mesh
from mpi4py import MPI

from _common import RESULTS, print_table, write_json

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=64, help="cells per side")
parser.add_argument("--widths", default="30,100,315", help="hidden widths (depth 2)")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--out", default=str(RESULTS / "b6_network_size.json"))
args = parser.parse_args()

comm = MPI.COMM_WORLD
msh = mesh.create_unit_square(comm, args.n, args.n)
x = ufl.SpatialCoordinate(msh)
rows = []
for width in map(int, args.widths.split(",")):
    torch.manual_seed(0)
    u = nf.NeuralField(msh, nf.MLP(2, width=width, depth=2))
    energy = nf.RegressionEnergy(u, abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1]), norm="H1")
    metric = nf.H1(u)
    flow = nf.NaturalGradientFlow(energy, metric, eps=1e-6, alignment=False,
                                  petsc_options={"ksp_rtol": 1e-6, "ksp_max_it": 500})
    times, its = [], []
    for _ in range(args.repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        info = flow.direction()
        times.append(time.perf_counter() - t0)
        its.append(info["ksp_its"])
    rss = comm.allreduce(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, op=MPI.MAX)
    P = u.num_params
    rows.append({"width": width, "params": P, "dofs": u.space.dofmap.index_map.size_global,
                 "solve_s_median": statistics.median(times), "solve_s_all": times,
                 "cg_its": its, "peak_rss_MiB": rss, "dense_gram_GiB": 8 * P**2 / 2**30})
    metric.destroy()
for r in rows:
    r["cg_its_first"] = r["cg_its"][0]
print_table(f"B6: one natural-gradient solve, H1 Gram, P1 {args.n}x{args.n}, {comm.size} rank(s)",
            [("params", "params"), ("solve_s_median", "solve [s]"), ("cg_its_first", "CG its"),
             ("peak_rss_MiB", "peak RSS [MiB]"), ("dense_gram_GiB", "dense Gram would need [GiB]")],
            rows)
write_json(args.out, {"benchmark": "B6", "args": vars(args), "rows": rows})
