"""PDE-constrained reduced energies from the user's own UFL forms (docs/method.md, section 1.3).

The state ``y(k)`` solves ``F(y, k; v) = 0`` for all test functions ``v`` (any UFL
residual: linear or nonlinear, scalar or vector, with Dirichlet conditions); the
unknown coefficient ``k`` is a :class:`~nngf_fem.control.FunctionControl` (a
:class:`~nngf_fem.field.NeuralField` or a :class:`~nngf_fem.classical.FEControl`). The reduced
energy is ``E(k) = D(y(k)) + R(k)``. With the Lagrangian ``L = D + R + F(y, k; p)``:

* forward: Newton on ``F`` (one step for linear problems), PETSc KSP by prefix;
* adjoint: ``(dF/dy)^* p = -dD/dy`` with homogeneous Dirichlet conditions;
* derivative: ``E'(k)[dk] = dF/dk(y, k; p)[dk] + R'(k)[dk]``, assembled on the
  field's space (the dual vector the flow needs).

All forms come from ``ufl.derivative`` / ``ufl.adjoint`` of the user's ``F``.
"""

from nngf_fem.control import FunctionControl, require
from nngf_fem.energies import EnergyFunctional
from nngf_fem.errors import SolverError
from nngf_fem.mpi import raise_on_any
from nngf_fem.observations import PointObservations
from nngf_fem.solvers import KrylovSolver

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ufl
from dolfinx import fem, la
from dolfinx.fem.petsc import (
    apply_lifting,
    assemble_matrix,
    assemble_vector,
    create_vector,
    set_bc,
)
from mpi4py import MPI
from petsc4py import PETSc

__all__ = ["PDEConstrainedEnergy", "Tikhonov", "add_noise", "coordinate_noise",
           "discrepancy_stop", "synthetic_state"]

LU_DEFAULTS = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}


class Tikhonov:
    """``R(k) = alpha/2 ||k - k_ref||^2`` in ``L2``, ``H1`` or ``H1seminorm``.

    Args:
        alpha: weight (>= 0).
        metric: ``"L2"``, ``"H1"`` or ``"H1seminorm"``.
        reference: ``k_ref`` (UFL expression, constant or Function); default 0.
    """

    def __init__(self, alpha: float, metric: str = "L2", reference=None):
        if not (isinstance(alpha, int | float) and np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"Tikhonov alpha must be a finite number >= 0, got {alpha!r}")
        if metric not in ("L2", "H1", "H1seminorm"):
            raise ValueError(f"metric={metric!r} is not known; allowed: 'L2', 'H1', 'H1seminorm'")
        self.alpha, self.metric, self.reference = float(alpha), metric, reference

    def form(self, k) -> ufl.Form:
        """The UFL functional ``R(k)``."""
        d = k if self.reference is None else k - self.reference
        integrand = 0
        if self.metric in ("L2", "H1"):
            integrand += ufl.inner(d, d)
        if self.metric in ("H1", "H1seminorm"):
            integrand += ufl.inner(ufl.grad(d), ufl.grad(d))
        return 0.5 * self.alpha * integrand * ufl.dx


def _coefficients(form) -> list:
    return list(ufl.algorithms.extract_coefficients(form))


def _solve_inputs(F, bcs, exclude) -> list:
    """Callables returning copies of every input of the forward problem but ``exclude``."""
    out = []
    for c in _coefficients(F):
        if isinstance(c, fem.Function) and all(c is not e for e in exclude):
            out.append(lambda c=c: c.x.array.copy())
    for c in ufl.algorithms.analysis.extract_constants(F):
        if isinstance(c, fem.Constant):
            out.append(lambda c=c: np.array(c.value, dtype=np.float64, copy=True))
    for bc in bcs:
        g = bc.g
        if isinstance(g, fem.Function):
            out.append(lambda g=g: g.x.array.copy())
        elif isinstance(g, fem.Constant):
            out.append(lambda g=g: np.array(g.value, dtype=np.float64, copy=True))
        elif hasattr(g, "value"):  # a raw C++ constant
            out.append(lambda g=g: np.array(g.value, dtype=np.float64, copy=True))
    return out


def _name(f: fem.Function, role: str) -> str:
    """``'y'`` for a named Function; DOLFINx's default name ``f`` becomes the role."""
    return f"'{f.name}'" if f.name and f.name != "f" else f"(the {role} Function)"


class PDEConstrainedEnergy(EnergyFunctional):
    """Reduced energy ``E(k) = D(y(k)) + R(k)`` of a PDE-constrained problem.

    Args:
        F: residual ``F(y, k; v)`` (UFL form of rank 1 in the test function ``v``).
        state: the state Function ``y`` appearing in ``F`` (its values are the initial
            Newton guess and are updated by every forward solve).
        bcs: Dirichlet conditions of the state.
        control: the unknown coefficient, a :class:`~nngf_fem.control.FunctionControl` (a
            NeuralField or an FEControl) whose ``.ufl`` appears in ``F``.
        misfit: data misfit ``D(y)``, a UFL form of rank 0 (full field, subdomain via
            ``ufl.dx(tag)``, boundary via ``ufl.ds``).
        observations: point observations of the state, added to the misfit.
        regularization: a :class:`Tikhonov`, a UFL functional of ``control.ufl``, a
            list of those, or None.
        petsc_options_prefix: prefix of the forward/adjoint KSP options.
        petsc_options: KSP options (default: LU with MUMPS).
        newton_rtol: relative residual tolerance of Newton.
        newton_atol: absolute residual tolerance of Newton.
        newton_max_it: maximal Newton iterations.
        reuse_factorization: for linear problems solved by a direct method (the
            default LU), solve the adjoint system with the transpose of the forward
            factorization instead of assembling and factorizing ``(dF/dy)^*`` anew.
        check_singular: after each direct forward solve, check the relative residual
            (and MUMPS' null-pivot count) and raise :class:`SolverError` for a singular
            or indefinite system instead of returning a meaningless state.
    """

    def __init__(
        self,
        F: ufl.Form,
        state: fem.Function,
        bcs: Sequence[fem.DirichletBC] = (),
        *,
        control: FunctionControl,
        misfit: ufl.Form | None = None,
        observations: PointObservations | None = None,
        regularization: Any = None,
        petsc_options_prefix: str = "nngf_pde_",
        petsc_options: Mapping[str, Any] | None = None,
        newton_rtol: float = 1e-12,
        newton_atol: float = 1e-14,
        newton_max_it: int = 50,
        reuse_factorization: bool = True,
        check_singular: bool = True,
    ):
        require(control, FunctionControl, "PDEConstrainedEnergy")
        super().__init__(control)
        if misfit is None and observations is None:
            raise ValueError("give a misfit form, point observations, or both")
        if observations is not None and observations.V != state.function_space:
            raise ValueError("the observations are defined on another space than the state")
        self.observations = observations
        if misfit is None:
            zero = fem.Constant(state.function_space.mesh, 0.0)  # keeps a valid empty misfit
            misfit = zero * ufl.inner(state, state) * ufl.dx
        self._validate(F, state, control, misfit)
        self.F, self.y, self.bcs, self.k = F, state, list(bcs), control
        self.state_name = _name(state, "state")
        self.check_singular = bool(check_singular)
        self.singular_rtol = 1e-6
        self._good: tuple | None = None  # (key, state) of the last finite energy
        self._adj_for: tuple | None = None  # key at which (dF/dy)^* was assembled
        V = state.function_space
        (v,) = F.arguments()
        du = ufl.TrialFunction(V)
        J = ufl.derivative(F, state, du)
        expanded = ufl.algorithms.apply_derivatives.apply_derivatives(
            ufl.algorithms.apply_algebra_lowering.apply_algebra_lowering(J))
        self.linear = state not in _coefficients(expanded)
        regs = regularization if isinstance(regularization, list | tuple) else (
            [] if regularization is None else [regularization])
        # a zero-weight Tikhonov term folds to an empty UFL integral: leave it out
        regs = [r for r in regs if not (isinstance(r, Tikhonov) and r.alpha == 0.0)]
        R = 0
        for r in regs:
            R += r.form(control.ufl) if isinstance(r, Tikhonov) else r
        self.misfit = misfit
        self.regularization = R
        # forms
        self._F = fem.form(F)
        self._J = fem.form(J)
        self._Jadj = fem.form(ufl.adjoint(J))
        self._dD = fem.form(-ufl.derivative(misfit, state, ufl.TestFunction(V)))
        self._D = fem.form(misfit)
        self._R = fem.form(R) if regs else None
        self.p = fem.Function(V, name="adjoint")
        w = ufl.TestFunction(control.space)
        dk = ufl.derivative(ufl.replace(F, {v: self.p}), control.ufl, w)
        if regs:
            dk = dk + ufl.derivative(R, control.ufl, w)
        self._dk = fem.form(dk)
        self._dkvec = la.vector(control.space.dofmap.index_map, control.space.dofmap.index_map_bs)
        self._rows = control.owned_rows()
        # incremental (tangent-linear) forward and adjoint: the Gauss-Newton product
        self.y_inc = fem.Function(V, name="incremental_state")
        self.p_inc = fem.Function(V, name="incremental_adjoint")
        self.k_inc = fem.Function(control.space, name="control_direction")
        self._rhs_tangent = fem.form(-ufl.derivative(F, control.ufl, self.k_inc))
        try:
            self._rhs_inc_adj = fem.form(-ufl.derivative(
                ufl.derivative(misfit, state, ufl.TestFunction(V)), state, self.y_inc))
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"the misfit has no second derivative in the state: {err}") from err
        hk = ufl.derivative(ufl.replace(F, {v: self.p_inc}), control.ufl, w)
        if regs:
            hk = hk + ufl.derivative(ufl.derivative(R, control.ufl, w), control.ufl, self.k_inc)
        self._hk = fem.form(hk)
        # what else the forward solve depends on (a cache key besides the control)
        self._inputs = _solve_inputs(F, bcs, exclude=(state, control.ufl))
        # ... and the adjoint/derivative (misfit data, regularization constants)
        self._adj_inputs = _solve_inputs(misfit, [], exclude=(state, control.ufl))
        if regs:
            self._adj_inputs += _solve_inputs(R, [], exclude=(state, control.ufl))
        self._adj_inputs.append(lambda: np.zeros(0) if self.observations is None
                                else self.observations.data.copy())
        self._derivative_for: tuple | None = None
        self._derivative: np.ndarray | None = None
        # PETSc objects
        self._A = assemble_matrix(self._J, bcs=self.bcs)
        self._A.assemble()
        self._Aadj = assemble_matrix(self._Jadj, bcs=self.bcs)
        self._Aadj.assemble()
        self._b = create_vector(V)
        self._dx = create_vector(V)
        opts = dict(petsc_options or {})
        self._fwd = KrylovSolver(self._A, petsc_options_prefix=petsc_options_prefix + "forward_",
                                 petsc_options=opts, defaults=LU_DEFAULTS)
        self._adj = KrylovSolver(self._Aadj,
                                 petsc_options_prefix=petsc_options_prefix + "adjoint_",
                                 petsc_options=opts, defaults=LU_DEFAULTS)
        self.newton_rtol, self.newton_atol = newton_rtol, newton_atol
        self.newton_max_it = int(newton_max_it)
        self.counters.update({"forward": 0, "adjoint": 0, "incremental": 0,
                              "newton_iterations": 0, "factorizations": 0,
                              "back_substitutions": 0})
        #: seconds spent in forward (Newton) and adjoint solves, assembly included
        self.timings = {"forward": 0.0, "adjoint": 0.0}
        self.reuse_factorization = bool(reuse_factorization)
        self._A_for: np.ndarray | None = None  # control values the forward matrix was built at
        self._solved_for: tuple | None = None  # (control values, other inputs) of the state
        self._saved: list[tuple[tuple, np.ndarray]] = []  # a few solved states, newest last
        self._last_misfit = float("nan")
        self._last_regularization = float("nan")
        self._fwd_op_valid = False  # the forward KSP holds dF/dy at the solved state

    # ------------------------------------------------------------ checks
    @staticmethod
    def _validate(F, state, control, misfit) -> None:
        comm = control.comm
        if not isinstance(F, ufl.Form) or len(F.arguments()) != 1:
            raise ValueError("F must be a UFL form of rank 1 (a residual with one test function)")
        if not isinstance(state, fem.Function):
            raise TypeError(f"state must be a dolfinx Function, got {type(state).__name__}")
        coeffs = _coefficients(F)
        if state not in coeffs:
            raise ValueError(f"the state {_name(state, 'Function')} does not appear in F")
        if control.ufl not in coeffs:
            raise ValueError(f"the control {_name(control.ufl, 'Function')} does not "
                             "appear in F")
        if F.arguments()[0].ufl_function_space() != state.function_space:
            raise ValueError("the test function of F is not on the state's function space")
        if state.function_space.mesh is not control.mesh:
            raise ValueError("the state and the control live on different meshes")
        if not isinstance(misfit, ufl.Form) or len(misfit.arguments()) != 0:
            raise ValueError("misfit must be a UFL form of rank 0 (a functional)")
        if state not in _coefficients(misfit):
            raise ValueError(f"the misfit does not contain the state {_name(state, 'Function')}"
                             ": it would not depend on the control (write it in terms of "
                             "the state Function passed as `state`)")
        for c in _coefficients(misfit):
            if isinstance(c, fem.Function) and c is not state and c is not control.ufl:
                if c.function_space.mesh is not control.mesh:
                    raise ValueError(f"data '{c.name}' lives on a different mesh than the state")
                raise_on_any(comm, not np.all(np.isfinite(c.x.array)),
                             f"data '{c.name}' in the misfit contains NaN/Inf values")

    # ------------------------------------------------------------ solves
    def _residual(self) -> float:
        with self._b.localForm() as loc:
            loc.set(0.0)
        assemble_vector(self._b, self._F)
        apply_lifting(self._b, [self._J], [self.bcs], x0=[self.y.x.petsc_vec], alpha=-1.0)
        self._b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        set_bc(self._b, self.bcs, self.y.x.petsc_vec, -1.0)
        return self._b.norm()

    def _key(self) -> tuple:
        """What the state depends on: control values and the other inputs of ``F``."""
        return (self.k.ufl.x.array.copy(), *(f() for f in self._inputs))

    def _same(self, a: tuple | None, b: tuple) -> bool:
        """Whether two cache keys agree, decided on all ranks together.

        Keys hold local arrays: after a function-preserving growth, say, round-off may
        change the values on one rank only. A cache hit on one rank and a solve on
        another would deadlock in the solve's collectives, so a key counts as the same
        only when it is the same on every rank. Collective.
        """
        local = a is not None and len(a) == len(b) and all(
            np.array_equal(x, z) for x, z in zip(a, b, strict=True))
        return bool(self.comm.allreduce(local, op=MPI.LAND))

    def solve_forward(self) -> None:
        """Newton solve of ``F(y, k; v) = 0`` for the current control (cached).

        The state is cached by the control values *and* every other input of ``F``
        (``fem.Constant`` values, data Functions, Dirichlet values), so changing a
        constant in place triggers a new solve. The last few solved states are kept:
        returning to them (e.g. after a rejected trial step) costs no solve. Newton
        starts from the last state whose energy was finite (linear problems from zero),
        so a failed or overflowing trial never poisons later solves.

        Raises:
            SolverError: Newton or its linear solves did not converge, or the linear
                system is singular (all ranks).
        """
        key = self._key()
        if self._same(self._solved_for, key):
            return
        for old, y_old in self._saved:
            if self._same(old, key):  # back at a solved point: restore, no solve
                self.y.x.array[:] = y_old
                self._solved_for = key
                self._fwd_op_valid = False
                self.counters["restored"] = self.counters.get("restored", 0) + 1
                return
        self.counters["forward"] += 1
        self._solved_for = None
        self._fwd_op_valid = False
        t0 = time.perf_counter()
        if self.linear:  # one exact Newton step from zero: no memory of earlier trials
            self.y.x.array[:] = 0.0
        elif self._good is not None:
            self.y.x.array[:] = self._good[1]
        try:
            self._newton()
        except Exception:
            # do not warm-start the next solve from a failed state
            self.y.x.array[:] = 0.0 if self._good is None else self._good[1]
            self._A_for = None
            raise
        finally:
            self.timings["forward"] += time.perf_counter() - t0
        self._solved_for = key
        self._fwd_op_valid = True
        self._saved = [*self._saved[-3:], (key, self.y.x.array.copy())]

    def _check_linear_solve(self, rhs: PETSc.Vec, sol: PETSc.Vec, what: str) -> None:
        """Raise a clear error for a singular system (a direct solver 'succeeds' on it)."""
        ksp = self._fwd.ksp
        null_pivots = 0
        pc = ksp.getPC()
        if pc.getType() in ("lu", "cholesky"):
            try:
                F = pc.getFactorMatrix()
                if F.getType() == "mumps":
                    null_pivots = F.getMumpsInfog(28)
            except PETSc.Error:  # pragma: no cover - other factorization packages
                null_pivots = 0
        r = rhs.duplicate()
        self._A.mult(sol, r)
        r.axpy(-1.0, rhs)
        rel = r.norm() / max(rhs.norm(), 1e-300)
        r.destroy()
        bad = null_pivots > 0 or not np.isfinite(rel) or rel > self.singular_rtol
        raise_on_any(self.comm, bad,
                     f"{what}: the linear system dF/dy of the state {self.state_name} is "
                     f"singular or indefinite (relative residual {rel:.1e} after the solve, "
                     f"{null_pivots} null pivot(s)); check the boundary conditions (a pure "
                     "Neumann problem needs a constraint) and that the coefficient keeps "
                     "its sign", SolverError)

    def _newton(self) -> None:
        r0 = self._residual()
        r = r0
        direct = self._fwd.ksp.getType() == "preonly"
        for it in range(self.newton_max_it + 1):
            if r <= max(self.newton_atol, self.newton_rtol * r0) or (it > 0 and self.linear):
                break
            if it == self.newton_max_it:
                raise SolverError(f"Newton did not converge in {it} iterations "
                                  f"(residual {r:.3e}, initial {r0:.3e}) for the state "
                                  f"{self.state_name}")
            self._A.zeroEntries()
            assemble_matrix(self._A, self._J, bcs=self.bcs)
            self._A.assemble()
            self._A_for = self.k.ufl.x.array.copy() if self.linear else None
            self._fwd.ksp.setOperators(self._A)
            self._fwd.solve(self._b, self._dx)
            self.counters["factorizations"] += int(direct)
            self.counters["back_substitutions"] += 1
            if direct and self.check_singular:
                self._check_linear_solve(self._b, self._dx, "forward solve")
            self.y.x.petsc_vec.axpy(-1.0, self._dx)
            self.y.x.scatter_forward()
            self.counters["newton_iterations"] += 1
            r = self._residual()
            raise_on_any(self.comm, not np.isfinite(r),
                         f"Newton produced a non-finite residual for the state "
                         f"{self.state_name}", SolverError)

    def _factorization_reusable(self) -> bool:
        """The forward KSP holds a direct factorization of ``dF/dy`` at the current control."""
        if not (self.reuse_factorization and self.linear and self._A_for is not None
                and self._fwd_op_valid):
            return False
        if not self.comm.allreduce(bool(np.array_equal(self._A_for, self.k.ufl.x.array)),
                                   op=MPI.LAND):  # the same verdict on all ranks
            return False
        ksp = self._fwd.ksp
        return ksp.getType() == "preonly" and ksp.getPC().getType() in ("lu", "cholesky")

    def solve_adjoint(self) -> None:
        """Solve ``(dF/dy)^* p = -dD/dy`` at the current state (homogeneous bcs).

        For a linear state equation with a direct forward solver the matrix of the
        adjoint form is the transpose of the (factorized) forward matrix -- Dirichlet
        rows and columns are treated alike -- so the factorization is reused.
        """
        self.solve_forward()
        t0 = time.perf_counter()
        self.counters["adjoint"] += 1
        obs = self.observations
        self._jacobian_solve(self._dD, self.p, adjoint=True,
                             extra=None if obs is None else
                             (lambda arr: obs.add_adjoint_rhs(self.y, arr)))
        self.timings["adjoint"] += time.perf_counter() - t0

    def _assemble_adjoint_operator(self) -> None:
        """Assemble ``(dF/dy)^*`` at the current state unless it is there already."""
        if self._same(self._adj_for, self._solved_for):
            return
        self._Aadj.zeroEntries()
        assemble_matrix(self._Aadj, self._Jadj, bcs=self.bcs)
        self._Aadj.assemble()
        self._adj.ksp.setOperators(self._Aadj)
        self._adj_for = self._solved_for
        self.counters["factorizations"] += int(self._adj.ksp.getType() == "preonly")

    # ------------------------------------------- incremental (tangent) solves
    def _rhs(self, form, extra=None) -> None:
        with self._b.localForm() as loc:
            loc.set(0.0)
        assemble_vector(self._b, form)
        if extra is not None:
            with self._b.localForm() as loc:
                extra(loc.array)
        self._b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        set_bc(self._b, self.bcs, alpha=0.0)

    def incremental_forward(self, dk: np.ndarray) -> fem.Function:
        """Tangent-linear solve ``(dF/dy) dy = -(dF/dk) dk`` at the current state.

        Args:
            dk: control direction on the control's owned rows (as ``derivative()``).

        Returns:
            ``dy`` (the Function :attr:`y_inc`, overwritten by the next call).

        For a linear state equation with a direct solver the forward factorization is
        reused (a back-substitution); otherwise the factorization of ``(dF/dy)^*`` at
        the current state (from the adjoint solve) is used transposed.
        """
        dk = np.asarray(dk, dtype=np.float64)
        if dk.shape != self._rows.shape:
            raise ValueError(f"dk must have shape {self._rows.shape}, got {dk.shape}")
        self.solve_forward()
        self.k.write(dk, self.k_inc)
        self._jacobian_solve(self._rhs_tangent, self.y_inc, adjoint=False)
        return self.y_inc

    def incremental_adjoint(self) -> fem.Function:
        """Second-order adjoint ``(dF/dy)^* p = -D_yy[dy]`` for ``dy`` = :attr:`y_inc`.

        Returns the Function :attr:`p_inc` (overwritten by the next call).
        """
        obs = self.observations
        extra = None
        if obs is not None:  # the point misfit's Hessian: the weighted rows of dy(x_i)
            def extra(arr):
                obs.add_weighted_rows(obs.evaluate(self.y_inc), arr)
        self._jacobian_solve(self._rhs_inc_adj, self.p_inc, adjoint=True, extra=extra)
        return self.p_inc

    def gauss_newton_product(self, dk: np.ndarray) -> np.ndarray:
        """Gauss-Newton Hessian times a control direction, ``(S'^* D_yy S' + R'') dk``.

        ``S'`` is the linearized control-to-state map; the result is a dual vector on the
        control's owned rows (like :meth:`derivative`). One incremental forward and one
        incremental adjoint solve, both back-substitutions with a factorization at the
        current state (counted as one ``incremental`` solve). Symmetric positive
        semi-definite for convex misfits.
        """
        self.incremental_forward(dk)
        self.incremental_adjoint()
        self.counters["incremental"] += 1
        return self._assemble_dual(self._hk)

    def _assemble_dual(self, form) -> np.ndarray:
        """Assemble a linear form on the control's space; its owned rows (ghosts added)."""
        self._dkvec.array[:] = 0.0
        fem.assemble_vector(self._dkvec.array, form)
        self._dkvec.scatter_reverse(la.InsertMode.add)
        return self._dkvec.array[self._rows].copy()

    def _jacobian_solve(self, rhs_form, out: fem.Function, adjoint: bool, extra=None) -> None:
        """Solve with ``dF/dy`` (``adjoint``: its transpose) at the current state into ``out``.

        The right-hand side is ``rhs_form`` (plus ``extra(local_array)``) with homogeneous
        Dirichlet rows. The factorization used is the forward one for a linear problem
        with a direct solver (:meth:`_factorization_reusable`), else that of
        ``(dF/dy)^*`` assembled at the current state -- used transposed as needed.
        """
        self._rhs(rhs_form, extra)
        if self._factorization_reusable():
            solver, holds_transpose = self._fwd, False
        else:
            self._assemble_adjoint_operator()
            solver, holds_transpose = self._adj, True
        solver.solve(self._b, out.x.petsc_vec, transpose=holds_transpose != adjoint)
        self.counters["back_substitutions"] += 1
        out.x.scatter_forward()

    # ------------------------------------------------------- interface
    def value(self) -> float:
        """``D(y(k)) + R(k)`` (forward solve if the control changed)."""
        self.counters["value"] += 1
        self.solve_forward()
        self._last_misfit = self.comm.allreduce(fem.assemble_scalar(self._D))
        if self.observations is not None:
            self._last_misfit += self.observations.misfit(self.y)
        R = 0.0 if self._R is None else self.comm.allreduce(fem.assemble_scalar(self._R))
        self._last_regularization = R
        E = self._last_misfit + R
        if np.isfinite(E):  # Newton's initial guess for the next new control
            self._good = (self._solved_for, self.y.x.array.copy())
        return E

    def describe_value(self) -> str:
        """The parts of the last :meth:`value` (for messages about non-finite energies)."""
        ymax = self.comm.allreduce(float(np.max(np.abs(self.y.x.array), initial=0.0)), op=MPI.MAX)
        kv = self.k.ufl.x.array
        kmin = self.comm.allreduce(float(np.min(kv, initial=np.inf)), op=MPI.MIN)
        kmax = self.comm.allreduce(float(np.max(kv, initial=-np.inf)), op=MPI.MAX)
        return (f"misfit {self._last_misfit:.3e}, regularization {self._last_regularization:.3e}, "
                f"max |state| {ymax:.3e}, control {_name(self.k.ufl, 'control')} in "
                f"[{kmin:.3e}, {kmax:.3e}]")

    @property
    def pde_solves(self) -> int:
        """Forward + adjoint solves + incremental (Gauss-Newton) pairs."""
        c = self.counters
        return c["forward"] + c["adjoint"] + c["incremental"]

    def misfit_value(self) -> float:
        """``D(y)`` at the last evaluated state."""
        return self._last_misfit

    def derivative(self) -> np.ndarray:
        """Dual vector ``E'(k)[phi_j]`` on the control's owned rows (adjoint method).

        Cached: asked again at the same state (and the same misfit data), it costs no
        adjoint solve.
        """
        self.counters["derivative"] += 1
        self.solve_forward()
        key = (*self._solved_for, *(f() for f in self._adj_inputs))
        if self._derivative is not None and self._same(self._derivative_for, key):
            return self._derivative.copy()
        self.solve_adjoint()
        self._derivative = self._assemble_dual(self._dk)
        self._derivative_for = key
        return self._derivative.copy()

    def destroy(self) -> None:
        """Destroy PETSc objects."""
        for s in (self._fwd, self._adj):
            s.destroy()
        for obj in (self._A, self._Aadj, self._b, self._dx):
            obj.destroy()


def synthetic_state(energy: PDEConstrainedEnergy, k_true: fem.Function) -> fem.Function:
    """State ``y(k_true)`` for a known coefficient (for synthetic data); returns a copy.

    ``k_true`` must live on the control's space (interpolate the truth into it). The
    control's own values are restored afterwards.
    """
    k = energy.k
    if k_true.function_space != k.space:
        raise ValueError("k_true must be a Function on the control's space (control.space)")
    raise_on_any(energy.comm, not np.all(np.isfinite(k_true.x.array)),
                 f"k_true '{k_true.name}' contains NaN/Inf values")
    k.ufl.x.array[:] = k_true.x.array
    try:
        energy.solve_forward()
        y = fem.Function(energy.y.function_space, name=f"{energy.y.name}_true")
        y.x.array[:] = energy.y.x.array
    finally:
        k.update()
    return y


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def coordinate_noise(coords: np.ndarray, seed: int = 0) -> np.ndarray:
    """Standard normal samples that depend only on the points (and the seed).

    A counter-based hash of the rounded coordinates feeds a Box-Muller transform, so
    every dof gets the same sample whatever the mesh partition or dof numbering.
    """
    with np.errstate(over="ignore"):
        q = np.round(np.asarray(coords, dtype=np.float64) * 2**30).astype(np.int64)
        h = np.full(q.shape[0], np.uint64(seed) * np.uint64(0x632BE59BD9B4E019))
        for j in range(q.shape[1]):
            h = _splitmix64(h ^ q[:, j].astype(np.uint64))
        h1, h2 = _splitmix64(h), _splitmix64(h ^ np.uint64(0xD1B54A32D192ED03))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = ((h2 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def add_noise(data: fem.Function, level: float, seed: int = 0) -> fem.Function:
    """A copy of ``data`` with Gaussian noise of standard deviation ``level * max|data|``.

    The noise of each dof is a function of its coordinates (and component), so serial
    and parallel runs produce the same noisy field. Lagrange spaces only.
    """
    if not level >= 0:
        raise ValueError(f"noise level must be >= 0, got {level!r}")
    V = data.function_space
    imap, bs = V.dofmap.index_map, V.dofmap.index_map_bs
    comm = V.mesh.comm
    scale = level * comm.allreduce(float(np.max(np.abs(data.x.array), initial=0.0)), op=MPI.MAX)
    n = imap.size_local
    X = V.tabulate_dof_coordinates()[:n]
    keys = np.column_stack([np.repeat(X, bs, axis=0), np.tile(np.arange(bs), n)])
    out = fem.Function(V, name=f"{data.name}_noisy")
    out.x.array[: n * bs] = data.x.array[: n * bs] + scale * coordinate_noise(keys, seed)
    out.x.scatter_forward()
    return out


def discrepancy_stop(energy: PDEConstrainedEnergy, noise_misfit: float, tau: float = 1.1):
    """Morozov's discrepancy principle as a flow callback.

    Stops when the misfit ``D(y)`` drops below ``tau * noise_misfit`` (e.g. the misfit
    of the noisy data against the noise-free state: ``1/2 ||noise||^2``).
    """

    def callback(flow, rec) -> bool:
        return energy.misfit_value() <= tau * noise_misfit

    return callback
