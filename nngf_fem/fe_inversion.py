"""The classical function-space approach: a finite element coefficient and TAO L-BFGS.

The unknown is a nodal vector ``m`` of a Lagrange space ``Q_h`` and the coefficient is
``k = T(m)`` nodally (``T`` = identity, exp or softplus, as for a
:class:`~nngf_fem.field.NeuralField`). :class:`FEControl` holds ``k`` in a
``fem.Function`` that the user's UFL residual uses (``control.ufl``), so the same
:class:`~nngf_fem.pde.PDEConstrainedEnergy` -- forward, adjoint, Tikhonov -- serves a
network and an FE coefficient. The reduced derivative with respect to ``m`` is the
chain rule at the nodes,

    dE/dm_j = T'(m_j) E'(k)[phi_j],

where ``E'(k)[phi_j]`` is the dual vector the energy assembles.

:class:`TaoSolver` minimizes ``E(m)`` with PETSc TAO (default ``lmvm``, a limited-memory
BFGS with a More-Thuente line search) on a distributed PETSc Vec of ``m``. The
quasi-Newton matrix starts from the Hilbert metric ``A_H = alpha M + beta K`` of the
control space: the first direction is the negative Hilbert gradient
``-A_H^{-1} dE/dm`` and every BFGS update is taken in the ``A_H`` inner product (a
function-space L-BFGS whose iterates do not depend on the mesh as a Euclidean L-BFGS
would; the approach of pyadjoint's ``TAOSolver`` and hIPPYlib). The gradient norm TAO
reports and tests is the dual norm ``||dE/dm||_{H'} = sqrt(e^T A_H^{-1} e)``.

:class:`GaussNewtonCG` is the inexact Gauss-Newton-CG method of hIPPYlib-style codes on
the same FE coefficient: CG on ``H_GN d = -dE/dm`` preconditioned by ``A_H^{-1}``, each
Hessian product costing one incremental forward and one incremental adjoint solve.
"""

from nngf_fem.energies import EnergyFunctional
from nngf_fem.errors import SolverError
from nngf_fem.flow import FlowResult
from nngf_fem.metrics import RIESZ_DEFAULTS
from nngf_fem.mpi import raise_on_any
from nngf_fem.pde import PDEConstrainedEnergy, coordinate_noise
from nngf_fem.solvers import KrylovSolver, ksp_reason_name, set_options
from nngf_fem.taylor import TaylorResult

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh
from dolfinx.fem.petsc import assemble_matrix
from mpi4py import MPI
from petsc4py import PETSc

__all__ = ["FEControl", "GaussNewtonCG", "TaoSolver", "fe_taylor_test", "h1_matrix",
           "tao_reason_name"]


def _softplus(m: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, m)


def _sigmoid(m: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(m))
    return np.where(m >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus_inverse(k: np.ndarray) -> np.ndarray:
    return k + np.log(-np.expm1(-k))


#: name -> (T, T', T^{-1}) applied nodally
_TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "identity": (lambda m: m.copy(), np.ones_like, lambda k: k.copy()),
    "exp": (np.exp, np.exp, np.log),
    "softplus": (_softplus, _sigmoid, _softplus_inverse),
}

_TAO_REASONS = {
    getattr(PETSc.TAO.ConvergedReason, n): n
    for n in dir(PETSc.TAO.ConvergedReason)
    if not n.startswith("_") and isinstance(getattr(PETSc.TAO.ConvergedReason, n), int)
}


def tao_reason_name(reason: int) -> str:
    """Readable name of a PETSc ``TaoConvergedReason``."""
    return _TAO_REASONS.get(int(reason), str(reason))


class FEControl:
    """A finite element coefficient ``k = T(m)``, ``m`` a nodal vector of a Lagrange space.

    Offers what :class:`~nngf_fem.pde.PDEConstrainedEnergy` uses from its control
    (``comm``, ``mesh``, ``space``, ``function`` / ``ufl``, :meth:`owned_rows`,
    :meth:`update`), so the energy code is shared with :class:`NeuralField`.

    Args:
        domain: a ``dolfinx.mesh.Mesh`` or a Lagrange ``FunctionSpace`` ``Q_h``.
        transform: ``"identity"``, ``"exp"`` or ``"softplus"`` (nodal ``k = T(m)``).
        element: element of ``Q_h`` when ``domain`` is a mesh (default P1 scalar).
        value: initial coefficient ``k`` (a number; ``m = T^{-1}(value)``).
        name: name of the Function holding ``k`` (``m`` is named ``name + "_m"``).
    """

    representation = "fe"

    def __init__(self, domain: dmesh.Mesh | fem.FunctionSpace, *, transform: str = "identity",
                 element: tuple | None = None, value: float | None = None, name: str = "k"):
        if transform not in _TRANSFORMS:
            raise ValueError(f"transform={transform!r} is not known; allowed: "
                             f"{sorted(_TRANSFORMS)}")
        if isinstance(domain, fem.FunctionSpace):
            if element is not None:
                raise ValueError("give either a FunctionSpace or an element, not both")
            V = domain
        elif isinstance(domain, dmesh.Mesh):
            V = fem.functionspace(domain, element or ("Lagrange", 1))
        else:
            raise TypeError(f"domain must be a dolfinx Mesh or FunctionSpace, got {type(domain)}")
        if not V.element.interpolation_ident:
            raise ValueError("an FEControl needs a Lagrange-type space (nodal values); got "
                             f"element {V.ufl_element()}")
        self.transform_name = transform
        self._T, self._dT, self._Tinv = _TRANSFORMS[transform]
        self.space = V
        self.mesh = V.mesh
        self.comm: MPI.Comm = self.mesh.comm
        self.gdim = self.mesh.geometry.dim
        self.value_size = V.dofmap.index_map_bs
        imap = V.dofmap.index_map
        self.n_points = imap.size_local
        self._rows = np.arange(self.n_points * self.value_size, dtype=np.int64)
        self.function = fem.Function(V, name=name)
        self.m = fem.Function(V, name=f"{name}_m")
        if value is None:
            value = 0.0 if transform == "identity" else 1.0
        with np.errstate(all="ignore"):
            m0 = float(self._Tinv(np.array([float(value)]))[0])
        if not math.isfinite(m0):
            raise ValueError(f"value={value!r} is outside the range of transform {transform!r}")
        self.m.x.array[:] = m0
        self.update()

    # ------------------------------------------------------------ properties
    @property
    def ufl(self) -> fem.Function:
        """The Function holding ``k = T(m)`` (use it in UFL forms)."""
        return self.function

    @property
    def local_size(self) -> int:
        """Owned entries of ``m`` on this rank."""
        return self._rows.size

    @property
    def size(self) -> int:
        """Global number of unknowns (dofs of ``Q_h`` times the block size)."""
        return self.space.dofmap.index_map.size_global * self.value_size

    @property
    def num_params(self) -> int:
        """Number of unknowns (the analogue of a network's parameter count)."""
        return self.size

    def owned_rows(self) -> np.ndarray:
        """Indices of this rank's values in the local array of a space Function/Vec."""
        return self._rows

    # ----------------------------------------------------------------- m, k
    def get_m(self) -> np.ndarray:
        """Copy of the owned entries of ``m``."""
        return self.m.x.array[self._rows].copy()

    def set_m(self, m: np.ndarray) -> None:
        """Set the owned entries of ``m`` (ghosts are scattered) and update ``k = T(m)``.

        Raises:
            ValueError: wrong shape or NaN/Inf entries (on all ranks).
        """
        m = np.asarray(m, dtype=np.float64)
        raise_on_any(self.comm, m.shape != (self.local_size,),
                     f"m must have the local shape ({self.local_size},) of the owned dofs, "
                     f"got {m.shape}")
        raise_on_any(self.comm, not np.all(np.isfinite(m)), "m contains NaN/Inf values")
        self.m.x.array[self._rows] = m
        self.m.x.scatter_forward()
        self.update()

    def set_k(self, k: fem.Function | np.ndarray) -> None:
        """Set ``m = T^{-1}(k)`` from a Function on :attr:`space` or owned nodal values.

        Raises:
            ValueError: ``k`` on another space, NaN/Inf, or outside the range of ``T``.
        """
        if isinstance(k, fem.Function):
            if k.function_space != self.space:
                raise ValueError(f"k '{k.name}' must be a Function on the control's space")
            k = k.x.array[self._rows]
        k = np.asarray(k, dtype=np.float64)
        with np.errstate(all="ignore"):
            m = self._Tinv(k)
        raise_on_any(self.comm, not np.all(np.isfinite(m)),
                     f"k has NaN/Inf values or values outside the range of {self.transform_name}")
        self.set_m(m)

    def values(self) -> np.ndarray:
        """Owned values of ``k`` (flat, point-major)."""
        return self.function.x.array[self._rows].copy()

    def read(self, function: fem.Function) -> np.ndarray:
        """Owned values of a Function on :attr:`space`."""
        return function.x.array[self._rows].copy()

    def write(self, local_values: np.ndarray, function: fem.Function) -> None:
        """Write owned values into ``function`` and scatter ghosts."""
        function.x.array[self._rows] = local_values
        function.x.scatter_forward()

    def update(self) -> None:
        """Recompute ``k = T(m)`` at all local nodes (ghosts included).

        Raises:
            FloatingPointError: ``T(m)`` overflowed (on all ranks).
        """
        with np.errstate(over="ignore"):
            k = self._T(self.m.x.array)
        raise_on_any(self.comm, not np.all(np.isfinite(k)),
                     f"k = {self.transform_name}(m) is not finite (NaN/Inf)", FloatingPointError)
        self.function.x.array[:] = k

    def transform_derivative(self) -> np.ndarray:
        """``T'(m)`` at the owned nodes."""
        return self._dT(self.m.x.array[self._rows])

    def pullback(self, e: np.ndarray) -> np.ndarray:
        """Reduced derivative ``dE/dm_j = T'(m_j) e_j`` from the dual vector ``e = E'(k)``."""
        return self.transform_derivative() * np.asarray(e)

    def __repr__(self) -> str:
        return f"FEControl({self.space.ufl_element()}, transform={self.transform_name!r})"


def _pde_solves(counters: Mapping[str, int]) -> int:
    return sum(counters.get(k, 0) for k in ("forward", "adjoint", "incremental_forward",
                                            "incremental_adjoint"))


def _check_energy(energy: EnergyFunctional) -> FEControl:
    if not isinstance(energy, EnergyFunctional):
        raise TypeError(f"energy must be an EnergyFunctional, got {type(energy).__name__}")
    if not isinstance(energy.field, FEControl):
        raise TypeError("the energy's control must be an FEControl, got "
                        f"{type(energy.field).__name__}")
    return energy.field


def fe_taylor_test(energy: EnergyFunctional, direction: np.ndarray | None = None,
                   h0: float = 1e-2, n: int = 5, seed: int = 0) -> TaylorResult:
    """Second-order Taylor test of ``E(m)`` with the reduced derivative ``T'(m) E'(k)``.

    ``r(h) = |E(m + h dm) - E(m) - h dE/dm . dm|`` must decay like ``h^2``.

    Args:
        energy: an energy whose control is an :class:`FEControl`.
        direction: owned entries of ``dm`` (default: Gaussian noise that depends only on
            the dof coordinates, so serial and parallel runs test the same direction).
        h0: first step.
        n: number of halvings.
        seed: seed of the default direction.
    """
    control = _check_energy(energy)
    m0 = control.get_m()
    if direction is None:
        X = control.space.tabulate_dof_coordinates()[: control.n_points]
        bs = control.value_size
        keys = np.column_stack([np.repeat(X, bs, axis=0), np.tile(np.arange(bs), X.shape[0])])
        direction = coordinate_noise(keys, seed)
    direction = np.asarray(direction, dtype=np.float64)
    raise_on_any(control.comm, direction.shape != m0.shape,
                 f"direction must have the local shape {m0.shape}, got {direction.shape}")
    try:
        E0 = energy.value()
        slope = control.comm.allreduce(float(control.pullback(energy.derivative()) @ direction))
        hs = h0 * 0.5 ** np.arange(n)
        res = []
        for h in hs:
            control.set_m(m0 + h * direction)
            res.append(abs(energy.value() - E0 - h * slope))
    finally:
        control.set_m(m0)
    res = np.array(res)
    return TaylorResult(hs, res, np.log2(res[:-1] / res[1:]))


def h1_matrix(space: fem.FunctionSpace, alpha: float = 1.0, beta: float = 1.0) -> PETSc.Mat:
    """Assembled ``A_H = alpha M + beta K`` on ``space`` (the caller destroys it)."""
    if not (alpha > 0 and beta >= 0):
        raise ValueError(f"H1 needs alpha > 0 and beta >= 0, got alpha={alpha}, beta={beta}")
    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    A = assemble_matrix(fem.form((alpha * ufl.inner(u, v)
                                  + beta * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx))
    A.assemble()
    return A


class _DualNorm:
    """PETSc python-Mat context ``y = A_H^{-1} x`` (TAO's gradient-norm matrix)."""

    def __init__(self, solver: KrylovSolver):
        self.solver = solver

    def mult(self, mat, x, y):
        y.set(0.0)
        self.solver.solve(x, y)


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
        metric: optional assembled SPD matrix on the control space instead of
            ``alpha M + beta K`` (not destroyed by the solver).
        petsc_options_prefix: prefix of the TAO options (e.g. ``tao_type``,
            ``tao_ls_type``, ``tao_lmvm_mat_lmvm_hist_size``).
        petsc_options: TAO options (default ``{"tao_type": "lmvm"}``).
        riesz_options: options of the Riesz KSP (override CG + GAMG, rtol 1e-12).
    """

    def __init__(self, energy: EnergyFunctional, *, alpha: float = 1.0, beta: float = 1.0,
                 metric: PETSc.Mat | None = None, petsc_options_prefix: str = "nngf_tao_",
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
        if metric is None:
            self.A = h1_matrix(control.space, alpha, beta)
            self._own_A = True
        else:
            if not isinstance(metric, PETSc.Mat):
                raise TypeError(f"metric must be a PETSc Mat, got {type(metric).__name__}")
            raise_on_any(self.comm, metric.getLocalSize() != (n, n),
                         f"metric has local size {metric.getLocalSize()}, the control "
                         f"({n}, {n})")
            self.A, self._own_A = metric, False
        self.alpha, self.beta = float(alpha), float(beta)
        riesz_opts = {**RIESZ_DEFAULTS, **dict(riesz_options or {})}
        self._riesz = KrylovSolver(self.A, petsc_options_prefix=self.prefix + "riesz_norm_",
                                   petsc_options=riesz_opts)
        self._norm_mat = PETSc.Mat().createPython(((n, N), (n, N)), _DualNorm(self._riesz),
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
            if self._last is not None and np.array_equal(self._last[0], m):
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
        ``misfit``, ``gnorm``, ``step``, ``evaluations``, ``forward``, ``adjoint``,
        ``pde_solves`` and ``wall`` (seconds since the solver was made or last run).

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
        """Destroy the PETSc objects (TAO, Vecs, Riesz KSP, the metric if owned)."""
        for obj in (self.tao, self._norm_mat, self.x):
            if obj is not None:
                obj.destroy()
        self._riesz.destroy()
        if self._own_A and self.A is not None:
            self.A.destroy()
        self.tao = self._norm_mat = self.x = self.A = None

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class _Hessian:
    """PETSc python-Mat context of the Gauss-Newton Hessian ``H_GN`` (see GaussNewtonCG)."""

    def __init__(self, gn: "GaussNewtonCG"):
        self.gn = gn

    def mult(self, mat, x, y):
        y.array_w[:] = self.gn.hessian_action(x.array_r)


class _RieszPC:
    """PETSc python-PC context ``y = A_H^{-1} x``."""

    def __init__(self, solver: KrylovSolver):
        self.solver = solver

    def apply(self, pc, x, y):
        y.set(0.0)
        self.solver.solve(x, y)


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
        metric: optional assembled SPD matrix instead of ``alpha M + beta K``.
        petsc_options_prefix: prefix; the CG solver reads ``prefix`` (default
            ``ksp_type=cg``, ``ksp_max_it=50``), the Riesz map ``prefix + "riesz_"``.
            The incremental solves use the energy's forward/adjoint solvers (its
            ``petsc_options``).
        petsc_options: options of the CG solver.
        riesz_options: options of the Riesz KSP (override CG + GAMG, rtol 1e-12).
        eta_max: largest relative CG tolerance.
        armijo: sufficient-decrease constant.
        backtrack: step reduction factor.
        max_backtracks: backtracking steps before the step is declared failed.
    """

    def __init__(self, energy: PDEConstrainedEnergy, *, alpha: float = 1.0, beta: float = 1.0,
                 metric: PETSc.Mat | None = None, petsc_options_prefix: str = "nngf_gncg_",
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
        if metric is None:
            self.A, self._own_A = h1_matrix(control.space, alpha, beta), True
        else:
            raise_on_any(self.comm, metric.getLocalSize() != (n, n),
                         f"metric has local size {metric.getLocalSize()}, the control "
                         f"({n}, {n})")
            self.A, self._own_A = metric, False
        self._riesz = KrylovSolver(self.A, petsc_options_prefix=self.prefix + "riesz_",
                                   petsc_options={**RIESZ_DEFAULTS, **dict(riesz_options or {})})
        self._H = PETSc.Mat().createPython(((n, N), (n, N)), _Hessian(self), comm=self.comm)
        self._H.setUp()
        self.ksp = PETSc.KSP().create(self.comm)
        self.ksp.setOperators(self._H)
        pc = self.ksp.getPC()
        pc.setType("python")
        pc.setPythonContext(_RieszPC(self._riesz))
        set_options(self.ksp, self.prefix, {"ksp_type": "cg", "ksp_max_it": 50,
                                            "ksp_norm_type": "preconditioned",
                                            **dict(petsc_options or {})})
        self._rhs, self._d = self._H.createVecRight(), self._H.createVecRight()
        self._gv, self._rv = self._H.createVecRight(), self._H.createVecRight()
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
        self._gv.array[:] = g
        self._rv.set(0.0)
        self._riesz.solve(self._gv, self._rv)
        return math.sqrt(max(self._gv.dot(self._rv), 0.0))

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
        incremental) and ``wall``.

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
                self._gv.array[:] = g
                self._riesz.solve(self._gv, self._rv)
                d = -self._rv.array_r.copy()
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
        """Destroy the PETSc objects (CG and Riesz KSPs, vectors; the metric if owned)."""
        self._riesz.destroy()
        for obj in (self.ksp, self._H, self._rhs, self._d, self._gv, self._rv):
            if obj is not None:
                obj.destroy()
        if self._own_A and self.A is not None:
            self.A.destroy()
        self.ksp = self._H = self.A = None

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
