"""Driver for tests/test_mpi_faults.py: one fault per run on ``mpiexec -n 2``.

Usage: ``mpiexec -n 2 python fault_driver.py MODE OUT_DIR``. Every mode must END the job
(non-zero exit, a clear message on stderr) instead of hanging; the test runs it with a
timeout. Each rank first prints ``pid RANK PID`` (so that the test can clean up).
"""

import nngf_fem as nf  # installs the abort hook (COMM_WORLD.size > 1)

import errno
import os
import pathlib
import sys
import time

import torch
import ufl
from dolfinx import mesh
from mpi4py import MPI

comm = MPI.COMM_WORLD
mode, out = sys.argv[1], pathlib.Path(sys.argv[2])
print(f"pid {comm.rank} {os.getpid()}", flush=True)


def tiny_flow() -> nf.NaturalGradientFlow:
    msh = mesh.create_unit_square(comm, 4, 4)
    torch.manual_seed(0)
    u = nf.NeuralField(msh, nf.MLP(2, 4))
    x = ufl.SpatialCoordinate(msh)
    return nf.NaturalGradientFlow(nf.RegressionEnergy(u, x[0] * x[1], norm="H1"))


if mode == "raise_rank1":  # rank 1 fails while rank 0 waits in a collective
    if comm.rank == 1:
        time.sleep(0.5)
        raise ValueError("deliberate failure on rank 1")
    comm.Barrier()
elif mode == "raise_rank0":
    if comm.rank == 0:
        time.sleep(0.5)
        raise ValueError("deliberate failure on rank 0")
    comm.Barrier()
elif mode == "raise_in_callback":  # a user callback fails on one rank inside run()
    def callback(flow, rec):
        if comm.rank == 1 and flow.iteration == 2:
            raise RuntimeError("deliberate callback failure on rank 1")

    tiny_flow().run(20, callback=callback)
elif mode == "checkpoint_is_directory":
    flow = tiny_flow()
    if comm.rank == 0:
        (out / "checkpoint.pt").mkdir(parents=True)
    comm.Barrier()
    nf.save_checkpoint(out / "checkpoint.pt", flow)
elif mode == "history_is_directory":
    if comm.rank == 0:
        (out / "history.json").mkdir(parents=True)
    comm.Barrier()
    nf.io.write_history(out, [{"iteration": 0, "energy": 1.0}], comm)
elif mode == "vtx_parent_is_file":
    flow = tiny_flow()
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "not_a_folder").write_text("x")
    comm.Barrier()
    nf.io.write_fields(out / "not_a_folder" / "u.bp", [flow.field.function])
elif mode == "checkpoint_disk_full":  # torch reports a full disk as RuntimeError
    flow = tiny_flow()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    torch.save = full_disk
    nf.save_checkpoint(out / "checkpoint.pt", flow)
elif mode == "history_disk_full":
    def full_disk(tmp, text):
        tmp.write_text(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    nf.io._write_text_synced = full_disk
    nf.io.write_history(out, [{"iteration": 0, "energy": 1.0}], comm)
elif mode == "sigint":  # rank 0 blocked in a collective, rank 1 in Python code
    print(f"ready {comm.rank}", flush=True)
    if comm.rank == 0:
        comm.Barrier()
    else:
        while True:
            time.sleep(0.05)
elif mode == "sigint_all_blocked":  # both ranks in C (MPI) code: only the watchdog helps
    print(f"ready {comm.rank}", flush=True)
    if comm.rank == 0:
        comm.Barrier()
    else:
        comm.recv(source=0, tag=77)
elif mode == "cache_differs_on_one_rank":  # must END normally: no rank may skip a solve
    import numpy as np
    from dolfinx import fem

    msh = mesh.create_unit_square(comm, 8, 8)
    torch.manual_seed(0)
    k = nf.NeuralField(msh, nf.MLP(2, 3), transform="exp")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V), ufl.TestFunction(V)
    facets = mesh.locate_entities_boundary(msh, 1, lambda x: np.full(x.shape[1], True))
    bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(V, 1, facets), V)
    F = (k.ufl * ufl.inner(ufl.grad(y), ufl.grad(v)) - v) * ufl.dx
    energy = nf.PDEConstrainedEnergy(F, y, [bc], control=k, misfit=0.5 * y**2 * ufl.dx)
    E0 = energy.value()
    energy.derivative()
    if comm.rank == 0 and k.ufl.x.array.size:  # round-off on one rank only (as after growth)
        k.ufl.x.array[0] = np.nextafter(k.ufl.x.array[0], np.inf)
    E1 = energy.value()
    energy.derivative()
    print(f"cache ok {comm.rank} {E1 - E0:.3e}", flush=True)
    raise SystemExit(0)
else:
    raise SystemExit(f"unknown mode {mode!r}")
print(f"rank {comm.rank}: finished without the expected failure", flush=True)
