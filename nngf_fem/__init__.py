"""nngf_fem: expansive natural neural gradient flows on finite elements.

DOLFINx supplies meshes, Sobolev metrics and PDE solves; a PyTorch network
parameterizes the unknown; the natural-gradient system ``J^T A_H J d = -b`` is
solved matrix-free with PETSc under MPI.
"""

from nngf_fem import _backend  # noqa: F401  (load order: dolfinx_solver before dolfinx)
from nngf_fem.errors import FlowDivergedError, NNGFError, SolverError
from nngf_fem.solvers import KrylovSolver

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "FlowDivergedError",
    "KrylovSolver",
    "NNGFError",
    "SolverError",
]
