"""The finite element control ``k = T(m)`` of the classical methods, and its Taylor test.

The unknown is a nodal vector ``m`` of a Lagrange space ``Q_h`` and the coefficient is
``k = T(m)`` nodally (``T`` = identity, exp or softplus, as for a
:class:`~nngf_fem.field.NeuralField`). :class:`FEControl` holds ``k`` in a
``fem.Function`` that the user's UFL residual uses (``control.ufl``): it is a
:class:`~nngf_fem.control.FunctionControl`, so the same
:class:`~nngf_fem.pde.PDEConstrainedEnergy` -- forward, adjoint, Tikhonov, incremental
solves -- and the same metrics (:class:`~nngf_fem.metrics.H1` ...) serve a network and
an FE coefficient. The reduced derivative with respect to ``m`` is the chain rule at
the nodes,

    dE/dm_j = T'(m_j) E'(k)[phi_j],

where ``E'(k)[phi_j]`` is the dual vector the energy assembles.
"""

from nngf_fem.control import FunctionControl
from nngf_fem.energies import EnergyFunctional
from nngf_fem.metrics import H1, Metric
from nngf_fem.mpi import raise_on_any
from nngf_fem.pde import coordinate_noise
from nngf_fem.taylor import TaylorResult, remainders

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from dolfinx import fem
from dolfinx import mesh as dmesh
from mpi4py import MPI

__all__ = ["FEControl", "fe_taylor_test"]


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
        res = remainders(energy, lambda h: control.set_m(m0 + h * direction), E0, slope, hs)
    finally:
        control.set_m(m0)
    return TaylorResult(hs, res, np.log2(res[:-1] / res[1:]))


class RieszContext:
    """``y = A_H^{-1} x`` through a metric's Riesz map, as a PETSc python context.

    Serves both as a python Mat (``mult``: TAO's gradient-norm matrix) and as a python PC
    (``apply``: the preconditioner of Gauss-Newton-CG).
    """

    def __init__(self, metric: Metric):
        self.metric = metric

    def mult(self, mat, x, y):
        y.array_w[:] = self.metric.riesz(x.array_r)

    def apply(self, pc, x, y):
        self.mult(pc, x, y)


def control_metric(control: FunctionControl, metric: Metric | None, alpha: float, beta: float,
                   prefix: str, options: Mapping[str, Any] | None) -> tuple[Metric, bool]:
    """The metric of a classical solver: ``metric`` or ``H1(control, alpha, beta)``.

    Returns the metric and whether the solver owns (and destroys) it.

    Raises:
        TypeError: ``metric`` is not a :class:`~nngf_fem.metrics.Metric`.
        ValueError: ``metric`` is defined on another control.
    """
    if metric is None:
        return H1(control, alpha, beta, petsc_options_prefix=prefix,
                  petsc_options=options), True
    if not isinstance(metric, Metric):
        raise TypeError("metric must be an nngf_fem Metric on the control (e.g. "
                        f"nf.H1(control, beta=l**2)), got {type(metric).__name__}")
    if metric.field is not control:
        raise ValueError("the metric is defined on another control than the energy's")
    return metric, False
