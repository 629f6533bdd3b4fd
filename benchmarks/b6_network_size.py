"""B6: time and memory of one matrix-free natural-gradient solve vs network size.

    mpirun -n 1 python benchmarks/b6_network_size.py [--n 64] [--repeats 3]

H1 regression on a P1 mesh; MLP(2, width, depth=2) with about 1k, 10k and 100k
parameters; one direction (G + eps I) d = -b by PETSc CG with the Nystrom
preconditioner. Reports median wall time of the solve, CG iterations, peak RSS, and
the memory a dense Gram matrix would need (8 P^2 bytes). Writes JSON.
"""

import nngf_fem as nf  # noqa: I001

import argparse
import json
import pathlib
import platform
import resource
import statistics
import time

import torch
import ufl
from dolfinx import mesh
from mpi4py import MPI

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=64, help="cells per side")
parser.add_argument("--widths", default="30,100,315", help="hidden widths (depth 2)")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--out", default="benchmarks/results/b6_network_size.json")
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
if comm.rank == 0:
    print(f"B6: one natural-gradient solve, H1 Gram, P1 {args.n}x{args.n}, {comm.size} rank(s)")
    print(f"{'params':>8}{'solve [s]':>11}{'CG its':>8}{'peak RSS [MiB]':>16}{'dense G [GiB]':>15}")
    for r in rows:
        print(f"{r['params']:>8}{r['solve_s_median']:>11.2f}{r['cg_its'][0]:>8}"
              f"{r['peak_rss_MiB']:>16.0f}{r['dense_gram_GiB']:>15.3f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "dolfinx": __import__("dolfinx").__version__, "nngf_fem": nf.__version__,
           "machine": platform.machine(), "ranks": comm.size,
           "torch_threads": torch.get_num_threads()}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "B6", "env": env, "args": vars(args), "rows": rows},
                              indent=1))
    tmp.replace(out)
