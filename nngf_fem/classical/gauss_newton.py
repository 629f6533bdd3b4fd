"""Inexact Gauss-Newton-CG on an :class:`~nngf_fem.classical.FEControl`.

The method of hIPPYlib-style codes: CG on ``H_GN d = -dE/dm`` preconditioned by the
Riesz map ``A_H^{-1}`` of the control's metric, each Hessian product costing one
incremental forward and one incremental adjoint solve
(:meth:`~nngf_fem.pde.PDEConstrainedEnergy.gauss_newton_product`, shared with the
network flows' Gauss-Newton steps).
"""

from nngf_fem.classical.fe_control import (
    RieszContext,
    _check_energy,
    _pde_solves,
    control_metric,
)
from nngf_fem.errors import SolverError
from nngf_fem.flow import FlowResult
from nngf_fem.metrics import Metric
from nngf_fem.mpi import raise_on_any
from nngf_fem.pde import PDEConstrainedEnergy
from nngf_fem.solvers import ksp_reason_name, set_options

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from petsc4py import PETSc

__all__ = ["GaussNewtonCG"]


class _Hessian:
    """PETSc python-Mat context of the Gauss-Newton Hessian ``H_GN`` (see GaussNewtonCG)."""

    def __init__(self, gn: "GaussNewtonCG"):
        self.gn = gn

    def mult(self, mat, x, y):
        y.array_w[:] = self.gn.hessian_action(x.array_r)


class GaussNewtonCG:
    """Inexact Gauss-Newton-CG on an :class:`FEControl` of a PDE-constrained energy.

    With ``k = T(m)``, ``S' = dy/dk`` and the misfit Hessian ``D_yy``, the Gauss-Newton
    Hessian is ``H_GN = T'(m) (S'^* D_yy S' + R''(k)) T'(m)`` (second derivatives of the
    state equation and of ``T`` are dropped, so ``H_GN`` is positive semi-definite). A
    product ``H_GN dm`` is the energy's public Gauss-Newton product
    (:meth:`~nngf_fem.pde.PDEConstrainedEnergy.gauss_newton_product`) of the direction
    ``dk = T'(m) dm``, scaled by ``T'(m)``: one incremental forward solve
    ``(dF/dy) dy = -dF/dk[dk]`` and one incremental adjoint solve
    ``(dF/dy)^* dp = -D_yy dy`` (homogeneous Dirichlet conditions; misfit forms and
    point observations), both with the energy's factorization of ``dF/dy`` at the
    current state (for linear problems the forward LU: back-substitutions only). Each
    outer step solves ``H_GN d = -dE/dm`` by CG preconditioned with the Riesz map
    ``A_H^{-1}`` (``alpha M + beta K``) to the Eisenstat-Walker tolerance
    ``min(eta_max, sqrt(||g||/||g_0||))`` in the dual norm, then backtracks on ``E``
    (Armijo).

    Counters (``energy.counters``): ``incremental`` counts Gauss-Newton products (one
    incremental forward + adjoint pair each, as ``energy.pde_solves`` counts them);
    ``incremental_forward`` / ``incremental_adjoint`` count the two solves of each
    pair separately, and the records' ``pde_solves`` (forward + adjoint + both
    incremental solves) counts every linear solve; ``factorizations`` and
    ``back_substitutions`` are the energy's.

    Args:
        energy: a :class:`~nngf_fem.pde.PDEConstrainedEnergy` whose control is an
            :class:`FEControl`.
        alpha: mass weight of the metric.
        beta: stiffness weight of the metric.
        metric: a :class:`~nngf_fem.metrics.Metric` on the control instead of
            ``H1(control, alpha, beta)`` (not destroyed by the solver).
        petsc_options_prefix: prefix; the CG solver reads ``prefix`` (default
            ``ksp_type=cg``, ``ksp_max_it=50``), the Riesz map ``prefix + "riesz_"``.
            The incremental solves use the energy's forward/adjoint solvers (its
            ``petsc_options``).
        petsc_options: options of the CG solver.
        riesz_options: options of the Riesz KSP (override the defaults of
            :func:`~nngf_fem.metrics.riesz_defaults`).
        eta_max: largest relative CG tolerance.
        armijo: sufficient-decrease constant.
        backtrack: step reduction factor.
        max_backtracks: backtracking steps before the step is declared failed.
    """

    def __init__(self, energy: PDEConstrainedEnergy, *, alpha: float = 1.0, beta: float = 1.0,
                 metric: Metric | None = None, petsc_options_prefix: str = "nngf_gncg_",
                 petsc_options: Mapping[str, Any] | None = None,
                 riesz_options: Mapping[str, Any] | None = None, eta_max: float = 0.5,
                 armijo: float = 1e-4, backtrack: float = 0.5, max_backtracks: int = 20):
        control = _check_energy(energy)
        if not isinstance(energy, PDEConstrainedEnergy):
            raise TypeError(f"energy must be a PDEConstrainedEnergy, got {type(energy).__name__}")
        if not 0 < eta_max < 1:
            raise ValueError(f"eta_max must be in (0, 1), got {eta_max!r}")
        if not (0 < armijo < 1 and 0 < backtrack < 1):
            raise ValueError(f"armijo and backtrack must be in (0, 1), got {armijo!r}, "
                             f"{backtrack!r}")
        if not isinstance(petsc_options_prefix, str) or not petsc_options_prefix:
            raise ValueError("petsc_options_prefix must be a non-empty string, got "
                             f"{petsc_options_prefix!r}")
        self.energy, self.control, self.comm = energy, control, control.comm
        self.field = control
        self.prefix = petsc_options_prefix
        self.eta_max, self.armijo, self.backtrack = eta_max, armijo, backtrack
        self.max_backtracks = int(max_backtracks)
        n, N = control.local_size, control.size
        self.metric, self._own_metric = control_metric(
            control, metric, alpha, beta, self.prefix + "riesz_", riesz_options)
        self._H = PETSc.Mat().createPython(((n, N), (n, N)), _Hessian(self), comm=self.comm)
        self._H.setUp()
        self.ksp = PETSc.KSP().create(self.comm)
        self.ksp.setOperators(self._H)
        pc = self.ksp.getPC()
        pc.setType("python")
        pc.setPythonContext(RieszContext(self.metric))
        set_options(self.ksp, self.prefix, {"ksp_type": "cg", "ksp_max_it": 50,
                                            "ksp_norm_type": "preconditioned",
                                            **dict(petsc_options or {})})
        self._rhs, self._d = self._H.createVecRight(), self._H.createVecRight()
        for key in ("incremental", "incremental_forward", "incremental_adjoint"):
            energy.counters.setdefault(key, 0)
        self.history: list[dict[str, Any]] = []
        self.iteration = 0
        self.converged, self.reason = False, "not run"

    # -------------------------------------------------------------- pieces
    def update_operators(self) -> None:
        """Solve the state at the current control (the incremental solves linearize there).

        The energy assembles and factorizes ``dF/dy`` itself when a Gauss-Newton product
        first needs it at a new state (nothing to do for linear problems solved by LU:
        the forward factorization is reused).
        """
        self.energy.solve_forward()

    def hessian_action(self, dm: np.ndarray) -> np.ndarray:
        """``H_GN dm`` on the owned entries (one incremental forward + adjoint pair)."""
        dT = self.control.transform_derivative()
        Hdk = self.energy.gauss_newton_product(dT * np.asarray(dm, dtype=np.float64))
        self.energy.counters["incremental_forward"] += 1
        self.energy.counters["incremental_adjoint"] += 1
        return dT * Hdk

    def _dual_norm(self, g: np.ndarray) -> float:
        return math.sqrt(max(self.metric.dual_norm_squared(g), 0.0))

    def _evaluate(self, m: np.ndarray) -> float:
        try:
            self.control.set_m(m)
            return self.energy.value()
        except (SolverError, FloatingPointError):  # raised on all ranks together
            return math.inf

    # ------------------------------------------------------------------ run
    def run(self, max_iter: int = 20, *, gatol: float = 0.0, grtol: float = 0.0,
            callback: Callable[["GaussNewtonCG", dict], bool | None] | None = None,
            raise_on_failure: bool = False) -> FlowResult:
        """Gauss-Newton-CG from the control's current ``m``; the control holds the result.

        Stops when ``||g||_{H'} <= gatol`` or ``<= grtol ||g_0||_{H'}`` (``g = dE/dm``),
        after ``max_iter`` outer steps (reason ``max_iter``), when the line search fails
        (``line_search_failure``) or when ``callback(solver, record)`` returns True. The
        records hold ``iteration``, ``energy``, ``misfit``, ``gnorm``, ``step``,
        ``cg_its``, ``cg_reason``, ``backtracks``, ``pde_solves`` (forward, adjoint and
        incremental), ``n_params`` (the unknowns) and ``wall``.

        Raises:
            SolverError: the run did not converge and ``raise_on_failure`` is set.
        """
        if not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
        for name, val in (("gatol", gatol), ("grtol", grtol)):
            if not (isinstance(val, int | float) and math.isfinite(val) and val >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
        t0 = time.perf_counter()
        m = self.control.get_m()
        E = self.energy.value()
        raise_on_any(self.comm, not math.isfinite(E), f"energy is not finite ({E})", SolverError)
        g = self.control.pullback(self.energy.derivative())
        gnorm = g0 = self._dual_norm(g)
        self.reason, self.converged = "max_iter", False
        step, cg_its, cg_reason, n_bt = 0.0, 0, "", 0
        for it in range(max_iter + 1):
            c = self.energy.counters
            rec = {"iteration": it, "energy": E, "misfit": self.energy.misfit_value(),
                   "gnorm": gnorm, "step": step, "cg_its": cg_its, "cg_reason": cg_reason,
                   "backtracks": n_bt, "pde_solves": _pde_solves(c),
                   "n_params": self.control.size, "wall": time.perf_counter() - t0}
            self.history.append(rec)
            self.iteration = it
            if gnorm <= gatol or (grtol > 0 and gnorm <= grtol * g0):
                self.reason, self.converged = "gtol", True
                break
            if callback is not None and callback(self, rec):
                self.reason, self.converged = "callback", True
                break
            if it == max_iter:
                break
            # inexact Gauss-Newton direction
            self.update_operators()
            eta = min(self.eta_max, math.sqrt(gnorm / g0)) if g0 > 0 else self.eta_max
            self.ksp.setTolerances(rtol=eta, atol=0.0)
            self._rhs.array[:] = -g
            self._d.set(0.0)
            self.ksp.solve(self._rhs, self._d)
            cg_its = self.ksp.getIterationNumber()
            cg_reason = ksp_reason_name(self.ksp.getConvergedReason())
            d = self._d.array_r.copy()
            gd = self.comm.allreduce(float(g @ d))
            if not (gd < 0 and math.isfinite(gd)):  # fall back to the negative H gradient
                d = -self.metric.riesz(g)
                gd = self.comm.allreduce(float(g @ d))
            # Armijo backtracking from the unit step
            t, accepted = 1.0, False
            for n_bt in range(self.max_backtracks + 1):  # noqa: B007
                E1 = self._evaluate(m + t * d)
                if math.isfinite(E1) and E1 <= E + self.armijo * t * gd:
                    accepted = True
                    break
                t *= self.backtrack
            if not accepted:
                self.control.set_m(m)
                self.reason = "line_search_failure"
                break
            m, E, step = m + t * d, E1, t
            g = self.control.pullback(self.energy.derivative())
            gnorm = self._dual_norm(g)
        self.control.set_m(m)
        if raise_on_failure and not self.converged:
            raise SolverError(f"Gauss-Newton-CG stopped with {self.reason} after "
                              f"{self.iteration} iterations")
        return FlowResult(self.converged, self.reason, self.iteration, E, self.history)

    def destroy(self) -> None:
        """Destroy the PETSc objects (CG KSP, vectors; the metric if the solver made it)."""
        for obj in (self.ksp, self._H, self._rhs, self._d):
            if obj is not None:
                obj.destroy()
        if self._own_metric and self.metric is not None:
            self.metric.destroy()
        self.ksp = self._H = self.metric = None

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
