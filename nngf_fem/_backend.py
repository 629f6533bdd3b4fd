"""Load order and threading for the DOLFINx + PETSc + torch stack.

The pip wheel ``dolfinx-solver-real`` must be imported before ``dolfinx`` or
``petsc4py`` (it loads the MPI and PETSc shared libraries). Conda and the official
Docker image have no such module; their DOLFINx works without it.
"""

import os
import warnings

try:  # pip wheel: must come first
    import dolfinx_solver  # noqa: F401
except ModuleNotFoundError as err:  # conda / Docker DOLFINx
    if err.name != "dolfinx_solver":
        raise

from mpi4py import MPI

# torch 2.14 warns about its own internal use of torch.jit.script on import
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)
import torch  # noqa: E402, I001


def _configure_torch_threads() -> None:
    """Give each MPI rank its share of the cores unless the user chose a thread count."""
    if "OMP_NUM_THREADS" in os.environ or "NNGF_FEM_TORCH_THREADS" in os.environ:
        n = os.environ.get("NNGF_FEM_TORCH_THREADS")
        if n:
            torch.set_num_threads(int(n))
        return
    size = MPI.COMM_WORLD.size
    if size > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // size))


_configure_torch_threads()
