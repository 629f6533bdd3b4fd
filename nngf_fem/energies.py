"""Energies ``E(u)`` of a neural field, with exact dual derivatives ``E'(u)``.

Every energy has the same small interface, used by the flows:

* ``field`` -- the control it depends on (a :class:`~nngf_fem.control.Control`: a
  :class:`~nngf_fem.field.NeuralField`, :class:`~nngf_fem.parametric.ParametricField` or
  :class:`~nngf_fem.classical.FEControl`);
* ``value()`` -- ``E`` at the field's current values (identical on all ranks);
* ``derivative()`` -- the dual vector ``e_j = E'(u)[phi_j]`` on the field's owned rows
  (``phi_j`` the basis of ``Q_h``, or the quadrature-point unit functions);
* ``counters`` -- evaluation counts (PDE solves for constrained energies).

:class:`FunctionalEnergy` covers any UFL functional of the field (derivative by
``ufl.derivative``); :class:`RegressionEnergy` and :class:`RitzEnergy` build on it.
"""

from nngf_fem._validate import as_int, as_real
from nngf_fem.control import Control, FunctionControl, require
from nngf_fem.mpi import raise_on_any
from nngf_fem.observations import PointObservations

from collections.abc import Callable

import numpy as np
import ufl
from dolfinx import fem, la

__all__ = ["EnergyFunctional", "FunctionalEnergy", "PointRegressionEnergy", "RegressionEnergy",
           "RitzEnergy"]


class EnergyFunctional:
    """Base class of energies of one control (see module docstring)."""

    def __init__(self, field: Control):
        require(field, Control, type(self).__name__)
        self.field = field
        self.comm = field.comm
        self.counters = {"value": 0, "derivative": 0}

    def value(self) -> float:
        """``E`` at the field's current values."""
        raise NotImplementedError

    def derivative(self) -> np.ndarray:
        """Dual vector ``E'(u)`` on the field's owned rows."""
        raise NotImplementedError

    def destroy(self) -> None:
        """Release PETSc objects (none by default)."""


def _measure(field: FunctionControl, quadrature_degree: int | None):
    if field.representation == "quadrature":
        return ufl.dx(metadata={"quadrature_degree": field.quadrature_degree})
    if quadrature_degree is None:
        return ufl.dx
    return ufl.dx(metadata={"quadrature_degree": quadrature_degree})


class FunctionalEnergy(EnergyFunctional):
    """``E(u) = int epsilon(u) dx``: any UFL functional of ``field.ufl``.

    Args:
        field: the neural field.
        functional: a UFL form of rank 0 containing ``field.ufl``.
    """

    def __init__(self, field: FunctionControl, functional: ufl.Form):
        require(field, FunctionControl, type(self).__name__)
        super().__init__(field)
        if not isinstance(functional, ufl.Form):
            raise TypeError("functional must be a UFL form, an integral such as "
                            f"0.5 * u.ufl**2 * ufl.dx; got {type(functional).__name__}")
        if functional.arguments():
            raise ValueError(f"functional must be a scalar (rank-0) form; it has "
                             f"{len(functional.arguments())} Test/TrialFunction argument(s)")
        if field.ufl not in ufl.algorithms.extract_coefficients(functional):
            raise ValueError("the energy functional does not contain the field (field.ufl)")
        self.functional = functional
        self._E = fem.form(functional)
        v = ufl.TestFunction(field.space)
        self._dE = fem.form(ufl.derivative(functional, field.ufl, v))
        self._b = la.vector(field.space.dofmap.index_map, field.space.dofmap.index_map_bs)
        self._rows = field.owned_rows()

    def value(self) -> float:
        """Assemble ``E`` (sum over ranks)."""
        self.counters["value"] += 1
        return self.comm.allreduce(fem.assemble_scalar(self._E))

    def derivative(self) -> np.ndarray:
        """Assemble ``E'(u)[phi_j]`` with ghost contributions accumulated."""
        self.counters["derivative"] += 1
        self._b.array[:] = 0.0
        fem.assemble_vector(self._b.array, self._dE)
        self._b.scatter_reverse(la.InsertMode.add)
        return self._b.array[self._rows].copy()


class RegressionEnergy(FunctionalEnergy):
    """``E(u) = 1/2 ||u - f||_H^2`` with ``H`` = L2 or H1 (supervised learning in a norm).

    Args:
        field: the neural field ``u``.
        target: ``f``, a UFL expression of ``ufl.SpatialCoordinate`` or a ``fem.Function``.
        norm: ``"L2"`` or ``"H1"`` (``alpha |u-f|^2 + beta |grad(u-f)|^2``).
        alpha: L2 weight.
        beta: gradient weight (H1 only).
        quadrature_degree: quadrature degree of the energy (default: estimated).
    """

    def __init__(self, field: FunctionControl, target, norm: str = "L2", alpha: float = 1.0,
                 beta: float = 1.0, quadrature_degree: int | None = None):
        require(field, FunctionControl, type(self).__name__)
        if norm not in ("L2", "H1"):
            raise ValueError(f"norm={norm!r} is not known; allowed: 'L2', 'H1'")
        alpha = as_real("alpha", alpha, minimum=0)
        beta = as_real("beta", beta, minimum=0)
        if alpha == 0 and (norm == "L2" or beta == 0):  # the energy would be 0
            raise ValueError(f"RegressionEnergy(norm={norm!r}) needs alpha > 0"
                             f"{' or beta > 0' if norm == 'H1' else ''}, got alpha={alpha:g}"
                             f"{f', beta={beta:g}' if norm == 'H1' else ''}")
        if quadrature_degree is not None:
            quadrature_degree = as_int("quadrature_degree", quadrature_degree, minimum=0)
        if norm == "H1" and field.representation == "quadrature":
            raise ValueError("an H1 regression energy needs representation='fe' (x-derivatives)")
        if isinstance(target, fem.Function):
            raise_on_any(field.comm, not np.all(np.isfinite(target.x.array)),
                         f"target Function '{target.name}' contains NaN/Inf values")
            if target.function_space.mesh is not field.mesh:
                raise ValueError("target Function lives on a different mesh than the field")
        u = field.ufl
        diff = u - target
        if ufl.shape(diff) != ufl.shape(u):
            raise ValueError(f"target shape {ufl.shape(target)} does not match field shape "
                             f"{ufl.shape(u)}")
        dx = _measure(field, quadrature_degree)
        integrand = alpha * ufl.inner(diff, diff)
        if norm == "H1":
            integrand += beta * ufl.inner(ufl.grad(diff), ufl.grad(diff))
        self.norm, self.target = norm, target
        super().__init__(field, 0.5 * integrand * dx)


class RitzEnergy(FunctionalEnergy):
    """Ritz energy ``E(u) = 1/2 a(u, u) - l(u)`` of an elliptic problem.

    Dirichlet data are imposed exactly by the field itself (``factor`` vanishing on
    the boundary and ``lift`` carrying the data, see :class:`NeuralField`).

    Args:
        field: the neural field ``u``.
        a: callable ``(u, v) -> ufl`` bilinear integrand/form.
        l: callable ``v -> ufl`` linear form.
    """

    def __init__(self, field: FunctionControl, a: Callable, l: Callable):  # noqa: E741
        require(field, FunctionControl, type(self).__name__)
        for name, fn, sig in (("a", a, "(u, v) -> form"), ("l", l, "v -> form")):
            if not callable(fn):
                raise TypeError(f"RitzEnergy: {name} must be a callable {sig}, got "
                                f"{type(fn).__name__}")
        u = field.ufl
        super().__init__(field, 0.5 * a(u, u) - l(u))


class PointRegressionEnergy(EnergyFunctional):
    """Supervised learning from samples: ``E(u) = 1/2 sum_i w_i |u_h(x_i) - f_i|^2``.

    The data measure is ``sum_i w_i delta_{x_i}`` (weights default to ``1/N``); ``u_h`` is
    the field's FE representation (Lagrange degree <= 2), so ``E'`` is exact.

    Args:
        field: the neural field (FE representation).
        points: ``(N, gdim)`` sample locations (same array on all ranks).
        values: ``(N,)`` or ``(N, m)`` samples.
        weights: optional positive weights.
    """

    def __init__(self, field: FunctionControl, points, values, weights=None):
        require(field, FunctionControl, type(self).__name__)
        super().__init__(field)
        if field.representation != "fe":
            raise ValueError("point regression needs representation='fe'")
        self.observations = PointObservations(field.space, points, values, weights)
        self._b = la.vector(field.space.dofmap.index_map, field.space.dofmap.index_map_bs)
        self._rows = field.owned_rows()

    def value(self) -> float:
        """``1/2 sum_i w_i |u_h(x_i) - f_i|^2``."""
        self.counters["value"] += 1
        return self.observations.misfit(self.field.ufl)

    def derivative(self) -> np.ndarray:
        """``sum_i w_i (u_h(x_i) - f_i) phi_j(x_i)`` on the owned rows."""
        self.counters["derivative"] += 1
        self._b.array[:] = 0.0
        self.observations.add_adjoint_rhs(self.field.ufl, self._b.array)
        self._b.array[:] *= -1.0
        self._b.scatter_reverse(la.InsertMode.add)
        return self._b.array[self._rows].copy()
