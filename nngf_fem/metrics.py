"""Hilbert metrics on a neural field's representation, with exact Riesz maps.

A metric ``<u, v>_H = u^T A_H v`` acts on the owned values of a control (any
:class:`~nngf_fem.control.FunctionControl`: a :class:`~nngf_fem.field.NeuralField` or a
:class:`~nngf_fem.classical.FEControl`; flat numpy arrays, one entry per owned row):

==============  ==========================================  =============================
metric          FE representation (``Q_h``)                 quadrature representation
==============  ==========================================  =============================
``L2``          mass matrix ``M`` (optional weight rho)     ``W = diag(w_q |det J_q|)``
``H1``          ``alpha M + beta K``                        ``W`` on values and x-gradients
``EnergyNorm``  any SPD bilinear form ``a`` (+ Dirichlet)   ``W`` on x-gradients
``Euclidean``   identity on nodal values                    identity on point values
==============  ==========================================  =============================

:meth:`Metric.riesz` solves ``A_H g = e`` for a dual vector ``e`` (the exact Hilbert
gradient ``g = R_H e``) with a PETSc KSP. The default (:func:`riesz_defaults`) is, on
one process, PETSc's sparse Cholesky factorization, made once, for metric matrices of up
to :data:`RIESZ_DIRECT_MAX_ROWS` global rows, and CG + GAMG to a relative 1e-12 in
parallel and for larger ones; ``petsc_options`` choose another solver (e.g.
``{"ksp_type": "cg", "pc_type": "gamg"}``).
"""

from nngf_fem._validate import as_int, as_real
from nngf_fem.control import FunctionControl, require
from nngf_fem.solvers import KrylovSolver

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import ufl
from dolfinx import fem
from dolfinx.fem.petsc import assemble_matrix
from dolfinx.fem.petsc import create_vector as create_petsc_vector
from petsc4py import PETSc

__all__ = ["Metric", "L2", "H1", "EnergyNorm", "Euclidean", "H1Seminorm", "riesz_defaults"]

#: iterative Riesz solve (large metric matrices): CG + GAMG to a relative 1e-12
RIESZ_ITERATIVE = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-12, "ksp_atol": 1e-30,
                   "ksp_max_it": 2000}
#: direct Riesz solve (one process): PETSc's sparse Cholesky factorization with a nested
#: dissection ordering, made once for the fixed metric matrix; every Riesz map is then a
#: pair of triangular solves. PETSc's own factorization, not MUMPS: a MUMPS
#: factorization holds MPI communicators of its own, and a few hundred live ones (e.g.
#: metrics not yet destroyed) exhaust MPICH's 2048 -- a PC set-up failure far away
RIESZ_DIRECT = {"ksp_type": "preonly", "pc_type": "cholesky",
                "pc_factor_mat_solver_type": "petsc", "pc_factor_mat_ordering_type": "nd"}
#: metric matrices with at most this many global rows (2D meshes; a quarter of it in 3D,
#: where the factors fill more) get :data:`RIESZ_DIRECT` by default on one process
#: (measured on P1 H1 matrices: 6-12x faster per Riesz map than CG + GAMG at 1k and 17k
#: rows, the factorization costing about as much as six CG solves)
RIESZ_DIRECT_MAX_ROWS = 200_000


def riesz_defaults(A: PETSc.Mat, options: Mapping[str, Any] | None = None,
                   tdim: int = 2) -> dict[str, Any]:
    """Default options of the Riesz KSP of the metric matrix ``A``.

    :data:`RIESZ_DIRECT` on one process when ``A`` has at most
    :data:`RIESZ_DIRECT_MAX_ROWS` global rows (a quarter of that for ``tdim == 3``),
    :data:`RIESZ_ITERATIVE` otherwise (in parallel, large matrices) -- and always when the
    user's ``options`` set the Krylov solver or preconditioner themselves (any ``ksp_*``
    or ``pc_*`` option): ``{"pc_type": "gamg"}`` means CG + GAMG, not a single V-cycle,
    and ``{"ksp_rtol": 1e-14}`` a tighter CG.
    """
    options = options or {}
    if any(k.startswith(("ksp_", "pc_")) for k in options):
        return dict(RIESZ_ITERATIVE)
    limit = RIESZ_DIRECT_MAX_ROWS // (4 if tdim >= 3 else 1)
    direct = A.getComm().getSize() == 1 and A.getSize()[0] <= limit
    return dict(RIESZ_DIRECT if direct else RIESZ_ITERATIVE)


class Metric:
    """Base class: an inner product on the owned values of a control.

    Args:
        field: the field whose representation the metric acts on.
        petsc_options_prefix: prefix of the Riesz solver's options.
        petsc_options: options of the Riesz KSP (override the defaults of
            :func:`riesz_defaults`: a Cholesky factorization, or CG + GAMG for large
            matrices).
    """

    name = "metric"
    #: whether the quadrature representation needs x-derivative rows
    with_grad = False

    def __init__(
        self,
        field: FunctionControl,
        *,
        petsc_options_prefix: str = "nngf_riesz_",
        petsc_options: Mapping[str, Any] | None = None,
    ):
        require(field, FunctionControl, type(self).__name__)
        self.field = field
        self.comm = field.comm
        self.prefix = petsc_options_prefix
        self.petsc_options = dict(petsc_options or {})
        self.A: PETSc.Mat | None = None
        self._solver: KrylovSolver | None = None
        self._x = self._b = None
        self._diag: PETSc.Mat | None = None
        self._blocks: dict[int, tuple[PETSc.Mat, PETSc.Mat]] = {}
        self.riesz_iterations = 0

    # ------------------------------------------------------------ FE helpers
    def _fe_setup(self, a_form: ufl.Form, bcs: Sequence[fem.DirichletBC] = ()) -> None:
        self.A = assemble_matrix(fem.form(a_form), bcs=list(bcs))
        self.A.assemble()
        self._x = self.A.createVecRight()
        self._b = self.A.createVecRight()
        assert self._x.getLocalSize() == self.field.local_size

    @property
    def is_fe(self) -> bool:
        """True when the metric is a FE matrix (FE representation)."""
        return self.A is not None

    @property
    def rows_per_value(self) -> int:
        """Rows of ``J`` per owned value (``1 + gdim`` for quadrature with x-derivatives)."""
        return 1 + self.field.gdim if (self.with_grad and not self.is_fe) else 1

    @property
    def needs_grad(self) -> bool:
        """Whether the linearization must include x-derivatives."""
        return self.with_grad and not self.is_fe

    # -------------------------------------------------------------- interface
    def apply(self, w: np.ndarray) -> np.ndarray:
        """``A_H w`` on owned rows (values, then x-derivatives for quadrature H1)."""
        if self.is_fe:
            self._x.array_w[:] = w
            self.A.mult(self._x, self._b)
            return self._b.array_r.copy()
        return self._quadrature_weights() * w

    def apply_block(self, W: np.ndarray) -> np.ndarray:
        """``A_H W`` for a block of owned-row vectors ``W`` (``n_rows x l``).

        FE metrics use one sparse-times-dense product (``MatMatMult``, its dense operands
        kept for the next block of the same width) instead of ``l`` matrix-vector
        products; collective. The result is column-major (Fortran order).
        """
        return self._block_product(W).copy(order="F")

    def gram_block(self, W: np.ndarray) -> np.ndarray:
        """This rank's part of ``W^T A_H W`` (``l x l``; sum over ranks for the Gram matrix).

        The same product as :meth:`apply_block`, read in place (no copy of ``A_H W``).
        """
        W = np.asarray(W, dtype=np.float64)
        return W.T @ self._block_product(W)

    def _block_product(self, W: np.ndarray) -> np.ndarray:
        """``A_H W``; for FE metrics a view of the kept PETSc operand (valid until the next)."""
        W = np.asarray(W, dtype=np.float64)
        if not self.is_fe:  # a diagonal metric: the weights, row by row
            return np.asfortranarray(self._quadrature_weights()[:, None] * W)
        if W.shape[1] == 0:
            return W.copy(order="F")
        width = W.shape[1]
        if width not in self._blocks:  # dense operands kept per block width (reused products)
            n, N = self.A.getLocalSize()[1], self.A.getSize()[1]
            X = PETSc.Mat().createDense(((n, N), (PETSc.DECIDE, width)), comm=self.comm)
            X.setUp()
            X.assemble()
            self._blocks[width] = (X, self.A.matMult(X))
        X, Y = self._blocks[width]
        X.getDenseArray()[:] = W  # column-major: fastest from a Fortran-ordered W
        X.assemble()
        self.A.matMult(X, Y)
        return Y.getDenseArray()

    def petsc_matrix(self) -> PETSc.Mat:
        """``A_H`` as a PETSc matrix on the owned rows (owned by the metric: do not destroy).

        The assembled matrix of a FE metric; for a diagonal metric (quadrature weights,
        :class:`Euclidean`) a diagonal matrix, made once. Used, e.g., as the initial
        quasi-Newton matrix of :class:`~nngf_fem.classical.TaoSolver`.

        Raises:
            ValueError: the metric has x-derivative rows (a quadrature ``H1``).
        """
        if self.is_fe:
            return self.A
        if self.rows_per_value != 1:
            raise ValueError(f"{type(self).__name__} on a quadrature field has x-derivative "
                             "rows: it has no matrix on the values")
        if self._diag is None:
            w = self._quadrature_weights()
            n = w.size
            N = self.comm.allreduce(n)
            D = PETSc.Mat().createAIJ(((n, N), (n, N)), nnz=(1, 0), comm=self.comm)
            D.setUp()
            d = D.createVecRight()
            d.array_w[:] = w
            D.setDiagonal(d)
            D.assemble()
            d.destroy()
            self._diag = D
        return self._diag

    def _quadrature_weights(self) -> np.ndarray:
        raise NotImplementedError

    def inner(self, u: np.ndarray, v: np.ndarray) -> float:
        """``<u, v>_H`` (global, identical on all ranks)."""
        return self.comm.allreduce(float(np.dot(u, self.apply(v))))

    def norm(self, u: np.ndarray) -> float:
        """``||u||_H``."""
        return float(np.sqrt(max(self.inner(u, u), 0.0)))

    def riesz(self, e: np.ndarray) -> np.ndarray:
        """Solve ``A_H g = e`` for the Riesz representer ``g`` of the dual vector ``e``.

        Raises:
            SolverError: the Krylov solve failed (on all ranks).
        """
        if self.is_fe:
            if self._solver is None:
                self._solver = KrylovSolver(self.A, petsc_options_prefix=self.prefix,
                                            petsc_options=self.petsc_options,
                                            defaults=riesz_defaults(self.A, self.petsc_options,
                                                                    self.field.mesh.topology.dim))
            self._b.array_w[:] = e
            self._x.set(0.0)
            self.riesz_iterations = self._solver.solve(self._b, self._x)
            return self._x.array_r.copy()
        return self._quadrature_riesz(e)

    def _quadrature_riesz(self, e: np.ndarray) -> np.ndarray:
        return e / self._quadrature_weights()

    def dual_norm_squared(self, e: np.ndarray, g: np.ndarray | None = None) -> float:
        """``||e||_{H'}^2 = e . g`` with ``g = R_H e`` (global)."""
        g = self.riesz(e) if g is None else g
        return self.comm.allreduce(float(np.dot(e, g)))

    def dense_matrix(self) -> np.ndarray:
        """``A_H`` as a dense array (serial debugging helper for small problems)."""
        if self.comm.size != 1:
            raise RuntimeError("dense_matrix() is a serial debugging helper")
        if self.is_fe:
            ai, aj, av = self.A.getValuesCSR()
            n = self.A.getSize()[0]
            dense = np.zeros((n, n))
            for r in range(n):
                dense[r, aj[ai[r] : ai[r + 1]]] = av[ai[r] : ai[r + 1]]
            return dense
        return np.diag(self._quadrature_weights())

    def destroy(self) -> None:
        """Destroy the PETSc objects."""
        for obj in (self._solver,):
            if obj is not None:
                obj.destroy()
        for X, Y in getattr(self, "_blocks", {}).values():
            X.destroy()
            Y.destroy()
        self._blocks = {}
        for obj in (self.A, self._x, self._b, self._diag):
            if obj is not None:
                obj.destroy()
        self._solver = self.A = self._x = self._b = self._diag = None

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # pragma: no cover
            pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.field.representation})"


def _trial_test(field: FunctionControl):
    return ufl.TrialFunction(field.space), ufl.TestFunction(field.space)


def _eval_at_quadrature(field: FunctionControl, expr) -> np.ndarray:
    """Owned quadrature-point values of a scalar UFL expression."""
    tdim = field.mesh.topology.dim
    cells = np.arange(field.mesh.topology.index_map(tdim).size_local, dtype=np.int32)
    return fem.Expression(expr, field.quadrature_points_ref).eval(field.mesh, cells).reshape(-1)


class L2(Metric):
    """``<u, v> = int rho u . v dx`` (rho = 1 by default).

    With a vector-valued field this is the ``L2(mu; R^d)`` metric on maps, ``mu = rho dx``.

    Args:
        field: the neural field.
        weight: optional positive density ``rho`` (UFL expression or constant).
        petsc_options_prefix: Riesz solver prefix.
        petsc_options: Riesz solver options.
    """

    name = "L2"

    def __init__(self, field: FunctionControl, weight=None, *,
                 petsc_options_prefix: str = "nngf_riesz_",
                 petsc_options: Mapping[str, Any] | None = None):
        super().__init__(field, petsc_options_prefix=petsc_options_prefix,
                         petsc_options=petsc_options)
        self.weight = weight
        if field.representation == "fe":
            u, v = _trial_test(field)
            rho = 1.0 if weight is None else weight
            self._fe_setup(rho * ufl.inner(u, v) * ufl.dx)
        else:
            w = field.weights.copy()
            if weight is not None:
                w *= _eval_at_quadrature(field, weight)
            if np.any(w <= 0):
                raise ValueError("L2 weight must be positive at all quadrature points")
            self._w = np.repeat(w, field.value_size)

    def _quadrature_weights(self) -> np.ndarray:
        return self._w


class H1(Metric):
    """``<u, v> = alpha int u . v dx + beta int grad u : grad v dx`` (defaults 1, 1).

    For a quadrature field the Gram metric uses the quadrature weights on values and
    torch x-derivatives; its Riesz map is computed in the Lagrange space of degree
    ``riesz_degree``: a dual vector ``e`` on the quadrature points defines
    ``e_h(v) = sum_q e_q v(x_q)`` on that space, ``g_h`` solves
    ``(g_h, v)_H1 = e_h(v)``, and :meth:`riesz` returns ``g_h`` at the quadrature
    points (so ``e . g = ||e_h||^2_{H1'}``).
    """

    name = "H1"
    with_grad = True

    def __init__(self, field: FunctionControl, alpha: float = 1.0, beta: float = 1.0, *,
                 riesz_degree: int = 2,
                 petsc_options_prefix: str = "nngf_riesz_",
                 petsc_options: Mapping[str, Any] | None = None):
        super().__init__(field, petsc_options_prefix=petsc_options_prefix,
                         petsc_options=petsc_options)
        self.alpha = as_real("H1 alpha", alpha, positive=True)
        self.beta = as_real("H1 beta", beta, minimum=0)
        riesz_degree = as_int("riesz_degree", riesz_degree, minimum=1)
        if field.representation == "fe":
            u, v = _trial_test(field)
            self._fe_setup((self.alpha * ufl.inner(u, v)
                            + self.beta * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx)
        else:
            m, d = field.value_size, field.gdim
            wv = np.repeat(field.weights, m)
            wg = np.repeat(field.weights, m * d)
            self._w = np.concatenate([self.alpha * wv, self.beta * wg])
            self._setup_fe_riesz(riesz_degree)

    def _setup_fe_riesz(self, degree: int) -> None:
        field = self.field
        shape = () if field.value_size == 1 else (field.value_size,)
        self.riesz_space = fem.functionspace(field.mesh, ("Lagrange", degree, shape))
        u, v = ufl.TrialFunction(self.riesz_space), ufl.TestFunction(self.riesz_space)
        self._Ah = assemble_matrix(fem.form(
            (self.alpha * ufl.inner(u, v) + self.beta * ufl.inner(ufl.grad(u), ufl.grad(v)))
            * ufl.dx))
        self._Ah.assemble()
        self._density = fem.Function(field.space)  # e_q / (w_q |det J_q|)
        dxq = ufl.dx(metadata={"quadrature_degree": field.quadrature_degree})
        self._Lh = fem.form(ufl.inner(self._density, v) * dxq)
        self._gh = fem.Function(self.riesz_space)
        self._eh = create_petsc_vector(self.riesz_space)  # ghosted: assembly adds to ghosts
        tdim = field.mesh.topology.dim
        self._cells = np.arange(field.mesh.topology.index_map(tdim).size_local, dtype=np.int32)
        self._gh_expr = fem.Expression(self._gh, field.quadrature_points_ref)

    def _quadrature_weights(self) -> np.ndarray:
        return self._w

    def _quadrature_riesz(self, e: np.ndarray) -> np.ndarray:
        from dolfinx.fem.petsc import assemble_vector as petsc_assemble_vector
        from petsc4py import PETSc as _P

        field = self.field
        if self._solver is None:
            self._solver = KrylovSolver(self._Ah, petsc_options_prefix=self.prefix,
                                        petsc_options=self.petsc_options,
                                        defaults=riesz_defaults(self._Ah, self.petsc_options,
                                                                self.field.mesh.topology.dim))
        field.write(e[: field.local_size] / np.repeat(field.weights, field.value_size),
                    self._density)
        with self._eh.localForm() as loc:
            loc.set(0.0)
        petsc_assemble_vector(self._eh, self._Lh)
        self._eh.ghostUpdate(addv=_P.InsertMode.ADD, mode=_P.ScatterMode.REVERSE)
        self._gh.x.petsc_vec.set(0.0)
        self.riesz_iterations = self._solver.solve(self._eh, self._gh.x.petsc_vec)
        self._gh.x.scatter_forward()
        return self._gh_expr.eval(field.mesh, self._cells).reshape(-1)

    def destroy(self) -> None:
        """Destroy the PETSc objects (including the quadrature Riesz space's)."""
        super().destroy()
        for name in ("_Ah", "_eh"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.destroy()
                setattr(self, name, None)


class EnergyNorm(Metric):
    """Energy inner product ``<u, v> = a(u, v)`` of an SPD bilinear form.

    Args:
        field: the neural field (FE representation).
        a: callable ``(u, v) -> ufl.Form``; default ``inner(grad u, grad v) dx``
            (the H1 seminorm, a norm on H1_0).
        bcs: Dirichlet conditions of the space (rows become identity in the Riesz solve).
    """

    name = "energy"
    with_grad = True

    def __init__(self, field: FunctionControl, a: Callable | None = None,
                 bcs: Sequence[fem.DirichletBC] = (), *,
                 petsc_options_prefix: str = "nngf_riesz_",
                 petsc_options: Mapping[str, Any] | None = None):
        super().__init__(field, petsc_options_prefix=petsc_options_prefix,
                         petsc_options=petsc_options)
        self.bcs = list(bcs)
        if field.representation == "fe":
            u, v = _trial_test(field)
            form = a(u, v) if a is not None else ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
            self._fe_setup(form, self.bcs)
        else:
            if a is not None or bcs:
                raise ValueError("a custom energy form needs representation='fe'")
            m, d = field.value_size, field.gdim
            self._w = np.concatenate([np.zeros(field.n_points * m),
                                      np.repeat(field.weights, m * d)])

    def _quadrature_weights(self) -> np.ndarray:
        return self._w

    def _quadrature_riesz(self, e: np.ndarray) -> np.ndarray:
        raise NotImplementedError(
            "the energy Riesz map needs a FE space: use representation='fe'"
        )


def H1Seminorm(field: FunctionControl, bcs: Sequence[fem.DirichletBC] = (),  # noqa: N802
               **kwargs) -> "EnergyNorm":
    """The H1_0 seminorm ``int grad u : grad v dx`` (an :class:`EnergyNorm` metric)."""
    return EnergyNorm(field, None, bcs, **kwargs)


class Euclidean(Metric):
    """Identity on the representation values (``G = J^T J``; a baseline)."""

    name = "euclidean"

    def __init__(self, field: FunctionControl, **kwargs):
        super().__init__(field, **kwargs)
        self._w = np.ones(field.local_size)

    def _quadrature_weights(self) -> np.ndarray:
        return self._w
