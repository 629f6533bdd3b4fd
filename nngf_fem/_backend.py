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


_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads64_", "openblas_set_num_threads", "MKL_Set_Num_Threads")


def limit_blas_threads(n: int) -> list[str]:
    """Set the thread count of every loaded OpenBLAS/MKL (numpy's included); returns them.

    Several MPI ranks on a few cores must not each spin up all-core BLAS pools: the
    busy-waiting threads then slow small ``numpy.linalg`` calls (QR, SVD) by 100x.
    """
    import ctypes

    done: list[str] = []
    try:
        with open("/proc/self/maps") as fh:
            libs = {line.split()[-1] for line in fh if ".so" in line
                    and ("blas" in line.lower() or "mkl_rt" in line)}
    except OSError:  # not Linux: nothing to do
        return done
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _BLAS_SETTERS:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done.append(f"{os.path.basename(path)}:{sym}")
                break
    return done


def _configure_threads() -> None:
    """Give each MPI rank its share of the cores unless the user chose a thread count.

    Applies to torch's intra-op pool and to the BLAS behind numpy.
    """
    if "OMP_NUM_THREADS" in os.environ or "NNGF_FEM_TORCH_THREADS" in os.environ:
        n = os.environ.get("NNGF_FEM_TORCH_THREADS")
        if n:
            torch.set_num_threads(int(n))
        return
    size = MPI.COMM_WORLD.size
    if size > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        share = max(1, (cores or 1) // size)
        torch.set_num_threads(share)
        import numpy.linalg  # noqa: F401  (loads numpy's BLAS so that it can be limited)

        limit_blas_threads(share)


_configure_threads()
