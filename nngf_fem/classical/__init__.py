"""The classical function-space approach: a finite element coefficient and its solvers.

* :class:`FEControl` -- the unknown is a nodal vector ``m`` of a Lagrange space and the
  coefficient ``k = T(m)``; it is a :class:`~nngf_fem.control.FunctionControl`, so the
  energies (:class:`~nngf_fem.pde.PDEConstrainedEnergy`) and metrics
  (:class:`~nngf_fem.metrics.H1` ...) of the network methods apply unchanged;
* :class:`TaoSolver` -- PETSc TAO L-BFGS (``lmvm``) with the control's Hilbert metric as
  the initial inverse Hessian (function-space quasi-Newton);
* :class:`GaussNewtonCG` -- inexact Gauss-Newton-CG preconditioned by the Riesz map,
  with the energy's incremental forward/adjoint solves;
* :func:`fe_taylor_test` -- the Taylor test of ``E(m)``.

These are the baselines the network methods are measured against (``benchmarks/``).
"""

from nngf_fem.classical.fe_control import FEControl, fe_taylor_test
from nngf_fem.classical.gauss_newton import GaussNewtonCG
from nngf_fem.classical.tao import TaoSolver, tao_reason_name

__all__ = ["FEControl", "GaussNewtonCG", "TaoSolver", "fe_taylor_test", "tao_reason_name"]
