"""Function-space L-BFGS with PETSc TAO on an :class:`~nngf_fem.classical.FEControl`.

:class:`TaoSolver` minimizes ``E(m)`` with PETSc TAO (default ``lmvm``, a limited-memory
BFGS with a More-Thuente line search) on a distributed PETSc Vec of ``m``. The
quasi-Newton matrix starts from the Hilbert metric ``A_H`` of the control space (by
default ``H1(control, alpha, beta)``, any :class:`~nngf_fem.metrics.Metric` on the
control otherwise): the first direction is the negative Hilbert gradient
``-A_H^{-1} dE/dm`` and every BFGS update is taken in the ``A_H`` inner product (a
function-space L-BFGS whose iterates do not depend on the mesh as a Euclidean L-BFGS
would; the approach of pyadjoint's ``TAOSolver`` and hIPPYlib). The gradient norm TAO
reports and tests is the dual norm ``||dE/dm||_{H'} = sqrt(e^T A_H^{-1} e)``.
"""

from nngf_fem.classical.fe_control import (
    RieszContext,
    _check_energy,
    _pde_solves,
    control_metric,
)
from nngf_fem.energies import EnergyFunctional
from nngf_fem.errors import SolverError
from nngf_fem.flow import FlowResult
from nngf_fem.metrics import RIESZ_ITERATIVE, Metric
from nngf_fem.solvers import set_options

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

__all__ = ["TaoSolver", "tao_reason_name"]

_TAO_REASONS = {
    getattr(PETSc.TAO.ConvergedReason, n): n
    for n in dir(PETSc.TAO.ConvergedReason)
    if not n.startswith("_") and isinstance(getattr(PETSc.TAO.ConvergedReason, n), int)
}


def tao_reason_name(reason: int) -> str:
    """Readable name of a PETSc ``TaoConvergedReason``."""
    return _TAO_REASONS.get(int(reason), str(reason))



class TaoSolver:
    """Minimize ``E(m)`` over an :class:`FEControl` with PETSc TAO (function-space L-BFGS).

    The initial quasi-Newton matrix of ``lmvm``/``blmvm`` is the Hilbert metric
    ``A_H = alpha M + beta K`` of the control space (``TaoLMVMSetH0``; its inverse is
    applied by a KSP with prefix ``petsc_options_prefix + "riesz_"``), and TAO's gradient
    norm is the dual norm ``sqrt(e^T A_H^{-1} e)`` of ``e = dE/dm``. A trial point whose
    PDE solve fails (or whose ``T(m)`` overflows) has ``E = inf``: the default
    More-Thuente line search then stops with ``DIVERGED_LS_FAILURE``, while
    ``tao_ls_type: armijo`` backtracks.

    Args:
        energy: an energy whose control is an :class:`FEControl` (e.g. a
            :class:`~nngf_fem.pde.PDEConstrainedEnergy`).
        alpha: mass weight of the metric.
        beta: stiffness weight of the metric (e.g. ``l^2`` for a length scale ``l``).
        metric: a :class:`~nngf_fem.metrics.Metric` on the control instead of
            ``H1(control, alpha, beta)`` (e.g. ``nf.Euclidean(control)`` for a textbook
            L-BFGS; not destroyed by the solver).
        petsc_options_prefix: prefix of the TAO options (e.g. ``tao_type``,
            ``tao_ls_type``, ``tao_lmvm_mat_lmvm_hist_size``).
        petsc_options: TAO options (default ``{"tao_type": "lmvm"}``).
        riesz_options: options of the Riesz KSP of the metric and of TAO's ``J0``
            (override CG + GAMG to a relative 1e-12 for ``J0`` and the metric's
            :func:`~nngf_fem.metrics.riesz_defaults`).
    """

    def __init__(self, energy: EnergyFunctional, *, alpha: float = 1.0, beta: float = 1.0,
                 metric: Metric | None = None, petsc_options_prefix: str = "nngf_tao_",
                 petsc_options: Mapping[str, Any] | None = None,
                 riesz_options: Mapping[str, Any] | None = None):
        control = _check_energy(energy)
        if not isinstance(petsc_options_prefix, str) or not petsc_options_prefix:
            raise ValueError("petsc_options_prefix must be a non-empty string, got "
                             f"{petsc_options_prefix!r}")
        self.energy, self.control, self.comm = energy, control, control.comm
        self.field = control
        self.prefix = petsc_options_prefix
        n, N = control.local_size, control.size
        self.metric, self._own_metric = control_metric(
            control, metric, alpha, beta, self.prefix + "riesz_", riesz_options)
        self.A = self.metric.petsc_matrix()
        # J0's KSP: CG + GAMG (RIESZ_ITERATIVE) unless the metric's options say otherwise.
        # Not the metric's direct default: TAO reads these options while J0's KSP still
        # holds its placeholder matrix, on which a factorization PC fails at set-up
        riesz_opts = ({**RIESZ_ITERATIVE, **self.metric.petsc_options} if self.metric.is_fe
                      else {"ksp_type": "preonly", "pc_type": "jacobi"})  # a diagonal A_H
        self._norm_mat = PETSc.Mat().createPython(((n, N), (n, N)), RieszContext(self.metric),
                                                  comm=self.comm)
        self._norm_mat.setUp()
        self.x = PETSc.Vec().createMPI((n, N), comm=self.comm)
        self.tao = PETSc.TAO().create(self.comm)
        self.tao.setType("lmvm")
        opts = {"tao_type": "lmvm", **dict(petsc_options or {})}
        # PETSc gives the LMVM matrix the fixed prefix "tao_lmvm_" (not the TAO's prefix):
        # its options (e.g. tao_lmvm_mat_lmvm_hist_size) are also pushed unprefixed
        db = PETSc.Options()
        lmvm_keys = [k for k in opts if k.startswith("tao_lmvm_mat_")]
        for k in lmvm_keys:
            db[k] = opts[k]
        try:
            set_options(self.tao, self.prefix, opts)
        finally:
            for k in lmvm_keys:
                db.delValue(k)
        self.tao_type = self.tao.getType()
        self._h0_ksp = None
        if self.tao_type in ("lmvm", "blmvm"):
            self.tao.setLMVMH0(self.A)
            self._h0_ksp = self.tao.getLMVMH0KSP()
            set_options(self._h0_ksp, self.prefix + "riesz_", riesz_opts)
        self.tao.setObjectiveGradient(self._objective_gradient, None)
        self.tao.setGradientNorm(self._norm_mat)
        self.tao.setMonitor(self._monitor)
        self.tao.setSolution(self.x)
        self.history: list[dict[str, Any]] = []
        self.evaluations = 0
        self.failed_evaluations = 0
        self.iteration = 0
        self.converged, self.reason = False, "not run"
        self._error: BaseException | None = None
        self._last: tuple[np.ndarray, float, float] | None = None
        self._callback = None
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------ callbacks
    def _objective_gradient(self, tao, x, g) -> float:
        try:
            m = x.array_r.copy()
            try:
                self.control.set_m(m)
                E = self.energy.value()
                dEdm = self.control.pullback(self.energy.derivative())
            except (SolverError, FloatingPointError):  # raised on all ranks together
                self.failed_evaluations += 1
                g.set(0.0)
                return math.inf
            self.evaluations += 1
            g.array_w[:] = dEdm
            misfit = getattr(self.energy, "misfit_value", lambda: math.nan)()
            self._last = (m, E, misfit)
            return E
        except BaseException as err:  # noqa: BLE001 - re-raised after TaoSolve
            self._error = err
            raise

    def _monitor(self, tao) -> None:
        try:
            its, f, gnorm, _, step, reason = tao.getSolutionStatus()
            m = self.x.array_r.copy()
            same = self._last is not None and np.array_equal(self._last[0], m)
            if self.comm.allreduce(same, op=MPI.LAND):  # collective: value() may solve
                misfit = self._last[2]
            else:  # the accepted point is not the last evaluated one
                self.control.set_m(m)
                f = self.energy.value()
                misfit = getattr(self.energy, "misfit_value", lambda: math.nan)()
                self._last = (m, f, misfit)
            c = self.energy.counters
            rec = {"iteration": int(its), "energy": float(f), "misfit": float(misfit),
                   "gnorm": float(gnorm), "step": float(step),
                   "evaluations": self.evaluations,
                   "failed_evaluations": self.failed_evaluations,
                   "forward": c.get("forward", 0), "adjoint": c.get("adjoint", 0),
                   "pde_solves": _pde_solves(c),
                   "n_params": self.control.size,
                   "wall": time.perf_counter() - self._t0}
            self.history.append(rec)
            self.iteration = int(its)
            if self._callback is not None and self._callback(self, rec):
                tao.setConvergedReason(PETSc.TAO.ConvergedReason.CONVERGED_USER)
        except BaseException as err:  # noqa: BLE001 - re-raised after TaoSolve
            self._error = err
            raise

    # ------------------------------------------------------------------ run
    def run(self, max_iter: int = 100, *, gatol: float = 0.0, grtol: float = 0.0,
            max_evaluations: int | None = None,
            callback: Callable[["TaoSolver", dict], bool | None] | None = None,
            raise_on_failure: bool = False) -> FlowResult:
        """Run TAO from the control's current ``m``; the control holds the result afterwards.

        Stops when ``||dE/dm||_{H'} <= gatol`` or ``<= grtol |E|`` (TAO's tests),
        after ``max_iter`` iterations (reason ``DIVERGED_MAXITS``) or
        ``max_evaluations`` energy evaluations, or when ``callback(solver, record)``
        returns True (``CONVERGED_USER``). Each record holds ``iteration``, ``energy``,
        ``misfit``, ``gnorm``, ``step``, ``evaluations``, ``failed_evaluations``,
        ``forward``, ``adjoint``, ``pde_solves``, ``n_params`` (the unknowns) and ``wall``
        (seconds since the solver was made or last run).

        Args:
            max_iter: maximal TAO iterations.
            gatol: absolute tolerance on the dual norm of the derivative.
            grtol: tolerance on ``||dE/dm||_{H'} / |E|``.
            max_evaluations: maximal energy evaluations (default: TAO's).
            callback: called after every iteration (iteration 0 is the start).
            raise_on_failure: raise :class:`SolverError` when TAO stops with a negative
                reason (line-search failure, NaN, maximal iterations ...).

        Raises:
            SolverError: TAO diverged and ``raise_on_failure`` is set.
        """
        if not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
        for name, val in (("gatol", gatol), ("grtol", grtol)):
            if not (isinstance(val, int | float) and math.isfinite(val) and val >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
        self.x.array[:] = self.control.get_m()
        self.tao.setMaximumIterations(max_iter)
        if max_evaluations is not None:
            self.tao.setMaximumFunctionEvaluations(int(max_evaluations))
        self.tao.setTolerances(gatol=gatol, grtol=grtol, gttol=0.0)
        self._callback = callback
        self._error = None
        self._t0 = time.perf_counter()
        try:
            self.tao.solve()
        except PETSc.Error as err:  # re-raise what a Python callback raised inside TaoSolve
            cause = self._error if self._error is not None else err.__cause__
            if cause is not None:
                raise cause from None
            raise
        finally:
            self._callback = None
        self.control.set_m(self.x.array_r.copy())
        reason = int(self.tao.getConvergedReason())
        self.reason, self.converged = tao_reason_name(reason), reason > 0
        E = self.energy.value()
        if raise_on_failure and not self.converged:
            raise SolverError(f"TAO ({self.tao_type}) stopped with {self.reason} after "
                              f"{self.tao.getIterationNumber()} iterations", reason=reason,
                              iterations=self.tao.getIterationNumber())
        return FlowResult(self.converged, self.reason, self.tao.getIterationNumber(), E,
                          self.history)

    def destroy(self) -> None:
        """Destroy the PETSc objects (TAO, Vecs; the metric if the solver made it)."""
        for obj in (self.tao, self._norm_mat, self.x):
            if obj is not None:
                obj.destroy()
        if self._own_metric and self.metric is not None:
            self.metric.destroy()
        self.tao = self._norm_mat = self.x = self.A = self.metric = None

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
