"""PDE-constrained reduced energies from the user's own UFL forms (METHOD.md section 1.3).

The state ``y(k)`` solves ``F(y, k; v) = 0`` for all test functions ``v`` (any UFL
residual: linear or nonlinear, scalar or vector, with Dirichlet conditions); the
unknown coefficient ``k`` is a :class:`~nngf_fem.field.NeuralField`. The reduced
energy is ``E(k) = D(y(k)) + R(k)``. With the Lagrangian ``L = D + R + F(y, k; p)``:

* forward: Newton on ``F`` (one step for linear problems), PETSc KSP by prefix;
* adjoint: ``(dF/dy)^* p = -dD/dy`` with homogeneous Dirichlet conditions;
* derivative: ``E'(k)[dk] = dF/dk(y, k; p)[dk] + R'(k)[dk]``, assembled on the
  field's space (the dual vector the flow needs).

All forms come from ``ufl.derivative`` / ``ufl.adjoint`` of the user's ``F``.
"""

from nngf_fem.energies import EnergyFunctional
from nngf_fem.errors import SolverError
from nngf_fem.field import NeuralField
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


class PDEConstrainedEnergy(EnergyFunctional):
    """Reduced energy ``E(k) = D(y(k)) + R(k)`` of a PDE-constrained problem.

    Args:
        F: residual ``F(y, k; v)`` (UFL form of rank 1 in the test function ``v``).
        state: the state Function ``y`` appearing in ``F`` (its values are the initial
            Newton guess and are updated by every forward solve).
        bcs: Dirichlet conditions of the state.
        control: the unknown coefficient, a NeuralField whose ``.ufl`` appears in ``F``.
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
    """

    def __init__(
        self,
        F: ufl.Form,
        state: fem.Function,
        bcs: Sequence[fem.DirichletBC] = (),
        *,
        control: NeuralField,
        misfit: ufl.Form | None = None,
        observations: PointObservations | None = None,
        regularization: Any = None,
        petsc_options_prefix: str = "nngf_pde_",
        petsc_options: Mapping[str, Any] | None = None,
        newton_rtol: float = 1e-12,
        newton_atol: float = 1e-14,
        newton_max_it: int = 50,
        reuse_factorization: bool = True,
    ):
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
        self.counters.update({"forward": 0, "adjoint": 0, "newton_iterations": 0})
        #: seconds spent in forward (Newton) and adjoint solves, assembly included
        self.timings = {"forward": 0.0, "adjoint": 0.0}
        self.reuse_factorization = bool(reuse_factorization)
        self._A_for: np.ndarray | None = None  # control values the forward matrix was built at
        self._solved_for: np.ndarray | None = None
        self._last_misfit = float("nan")

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
            raise ValueError(f"the state '{state.name}' does not appear in F")
        if control.ufl not in coeffs:
            raise ValueError(f"the control '{control.function.name}' does not appear in F")
        if F.arguments()[0].ufl_function_space() != state.function_space:
            raise ValueError("the test function of F is not on the state's function space")
        if state.function_space.mesh is not control.mesh:
            raise ValueError("the state and the control live on different meshes")
        if not isinstance(misfit, ufl.Form) or len(misfit.arguments()) != 0:
            raise ValueError("misfit must be a UFL form of rank 0 (a functional)")
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

    def solve_forward(self) -> None:
        """Newton solve of ``F(y, k; v) = 0`` for the current control (cached).

        Raises:
            SolverError: Newton or its linear solves did not converge (all ranks).
        """
        current = self.k.function.x.array
        if self._solved_for is not None and np.array_equal(self._solved_for, current):
            return
        self.counters["forward"] += 1
        self._solved_for = None
        t0 = time.perf_counter()
        try:
            self._newton()
        except Exception:
            self.y.x.array[:] = 0.0  # do not warm-start the next solve from a failed state
            self._A_for = None
            raise
        finally:
            self.timings["forward"] += time.perf_counter() - t0
        self._solved_for = self.k.function.x.array.copy()

    def _newton(self) -> None:
        r0 = self._residual()
        r = r0
        for it in range(self.newton_max_it + 1):
            if r <= max(self.newton_atol, self.newton_rtol * r0) or (it > 0 and self.linear):
                break
            if it == self.newton_max_it:
                raise SolverError(f"Newton did not converge in {it} iterations "
                                  f"(residual {r:.3e}, initial {r0:.3e})")
            self._A.zeroEntries()
            assemble_matrix(self._A, self._J, bcs=self.bcs)
            self._A.assemble()
            self._A_for = self.k.function.x.array.copy() if self.linear else None
            self._fwd.ksp.setOperators(self._A)
            self._fwd.solve(self._b, self._dx)
            self.y.x.petsc_vec.axpy(-1.0, self._dx)
            self.y.x.scatter_forward()
            self.counters["newton_iterations"] += 1
            r = self._residual()
            raise_on_any(self.comm, not np.isfinite(r), "Newton produced a non-finite residual",
                         SolverError)

    def _factorization_reusable(self) -> bool:
        """The forward KSP holds a direct factorization of ``dF/dy`` at the current control."""
        if not (self.reuse_factorization and self.linear and self._A_for is not None
                and np.array_equal(self._A_for, self.k.function.x.array)):
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
        reuse = self._factorization_reusable()
        if not reuse:
            self._Aadj.zeroEntries()
            assemble_matrix(self._Aadj, self._Jadj, bcs=self.bcs)
            self._Aadj.assemble()
            self._adj.ksp.setOperators(self._Aadj)
        with self._b.localForm() as loc:
            loc.set(0.0)
        assemble_vector(self._b, self._dD)
        if self.observations is not None:
            with self._b.localForm() as loc:
                self.observations.add_adjoint_rhs(self.y, loc.array)
        self._b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        set_bc(self._b, self.bcs, alpha=0.0)
        if reuse:
            self._fwd.ksp.solveTranspose(self._b, self.p.x.petsc_vec)
            reason = self._fwd.ksp.getConvergedReason()
            raise_on_any(self.comm, reason <= 0,
                         f"adjoint solve with the forward factorization failed (reason {reason})",
                         SolverError)
        else:
            self._adj.solve(self._b, self.p.x.petsc_vec)
        self.p.x.scatter_forward()
        self.timings["adjoint"] += time.perf_counter() - t0

    # ------------------------------------------------------- interface
    def value(self) -> float:
        """``D(y(k)) + R(k)`` (forward solve if the control changed)."""
        self.counters["value"] += 1
        self.solve_forward()
        self._last_misfit = self.comm.allreduce(fem.assemble_scalar(self._D))
        if self.observations is not None:
            self._last_misfit += self.observations.misfit(self.y)
        R = 0.0 if self._R is None else self.comm.allreduce(fem.assemble_scalar(self._R))
        return self._last_misfit + R

    def misfit_value(self) -> float:
        """``D(y)`` at the last evaluated state."""
        return self._last_misfit

    def derivative(self) -> np.ndarray:
        """Dual vector ``E'(k)[phi_j]`` on the control's owned rows (adjoint method)."""
        self.counters["derivative"] += 1
        self.solve_adjoint()
        self._dkvec.array[:] = 0.0
        fem.assemble_vector(self._dkvec.array, self._dk)
        self._dkvec.scatter_reverse(la.InsertMode.add)
        return self._dkvec.array[self._rows].copy()

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
    k.function.x.array[:] = k_true.x.array
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
