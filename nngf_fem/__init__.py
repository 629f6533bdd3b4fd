"""nngf_fem: expansive natural neural gradient flows on finite elements.

DOLFINx supplies meshes, Sobolev metrics and PDE solves; a PyTorch network
parameterizes the unknown; the natural-gradient system ``J^T A_H J d = -b`` is
solved matrix-free with PETSc under MPI.

Under ``mpiexec -n N`` (N > 1) importing the package installs an excepthook that aborts
all ranks on an uncaught exception or Ctrl-C instead of hanging (see
:mod:`nngf_fem.mpi`; opt out with ``NNGF_FEM_NO_ABORT_HOOK=1``).
"""

from nngf_fem import _backend  # noqa: F401, I001  (load order: dolfinx_solver before dolfinx)
from nngf_fem.mpi import _auto_install, install_excepthook
from nngf_fem.errors import FlowDivergedError, NNGFError, SolverError
from nngf_fem.solvers import KrylovSolver
from nngf_fem.models import MLP, ResMLP
from nngf_fem.field import Linearization, NeuralField
from nngf_fem.metrics import H1, L2, EnergyNorm, Euclidean, H1Seminorm, Metric
from nngf_fem.gram import GramOperator, NaturalGradientSolver, dense_gram
from nngf_fem import gram
from nngf_fem.energies import (
    EnergyFunctional,
    FunctionalEnergy,
    PointRegressionEnergy,
    RegressionEnergy,
    RitzEnergy,
)
from nngf_fem.flow import FlowResult, NaturalGradientFlow
from nngf_fem import baselines
from nngf_fem.baselines import TorchOptimizerFlow
from nngf_fem.expansion import ExpansionPolicy, run_expansive
from nngf_fem.checkpoint import load_checkpoint, save_checkpoint
from nngf_fem.observations import PointObservations
from nngf_fem.parametric import (
    ParametricEnergy,
    ParametricField,
    ParametricRegressionEnergy,
    ProductMetric,
)
from nngf_fem.pde import PDEConstrainedEnergy, Tikhonov, add_noise, discrepancy_stop
from nngf_fem.taylor import TaylorResult, taylor_test
from nngf_fem.classical import FEControl, GaussNewtonCG, TaoSolver, fe_taylor_test
from nngf_fem import classical, control, io, meshes
from nngf_fem.control import Control, FunctionControl, NetworkControl

_auto_install()  # MPI runs: an uncaught exception on one rank aborts all (no hang)

__version__ = "0.1.0"

__all__ = [
    "TaoSolver",
    "TaylorResult",
    "Tikhonov",
    "PDEConstrainedEnergy",
    "ParametricEnergy",
    "ParametricField",
    "ParametricRegressionEnergy",
    "ProductMetric",
    "PointRegressionEnergy",
    "PointObservations",
    "__version__",
    "EnergyFunctional",
    "ExpansionPolicy",
    "FEControl",
    "EnergyNorm",
    "Euclidean",
    "FlowDivergedError",
    "FlowResult",
    "FunctionalEnergy",
    "GaussNewtonCG",
    "GramOperator",
    "H1",
    "H1Seminorm",
    "KrylovSolver",
    "L2",
    "Linearization",
    "MLP",
    "Metric",
    "NNGFError",
    "NaturalGradientFlow",
    "NaturalGradientSolver",
    "NeuralField",
    "RegressionEnergy",
    "ResMLP",
    "RitzEnergy",
    "SolverError",
    "TorchOptimizerFlow",
    "baselines",
    "classical",
    "control",
    "Control",
    "FunctionControl",
    "NetworkControl",
    "gram",
    "install_excepthook",
    "io",
    "meshes",
    "dense_gram",
    "taylor_test",
    "fe_taylor_test",
    "discrepancy_stop",
    "add_noise",
    "load_checkpoint",
    "run_expansive",
    "save_checkpoint",
]
