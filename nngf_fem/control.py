"""What an unknown must offer: the control protocols.

Energies, metrics and flows never test for a concrete class; they use the members
listed here (structural typing, :class:`typing.Protocol`), so a user's own control type
works wherever it provides them. Three protocols, by what the caller needs:

* :class:`Control` -- every unknown: its communicator, mesh and space, the owned values
  at the points of its representation, and ``update()``. The base of every energy
  (:class:`~nngf_fem.energies.EnergyFunctional`).
* :class:`FunctionControl` -- an unknown that is one ``fem.Function`` in the user's UFL
  forms (``control.ufl``), with its owned rows. What the UFL energies
  (:class:`~nngf_fem.energies.FunctionalEnergy`,
  :class:`~nngf_fem.pde.PDEConstrainedEnergy`) and the metrics
  (:class:`~nngf_fem.metrics.L2`, :class:`~nngf_fem.metrics.H1`, ...) use.
  Implemented by :class:`~nngf_fem.field.NeuralField` and
  :class:`~nngf_fem.classical.FEControl`.
* :class:`NetworkControl` -- an unknown parameterized by a torch module whose flat
  parameter vector ``theta`` is **identical on all ranks**: parameters get/set, the
  linearization ``J`` (``jvp``/``vjp``), and the metric a flow uses by default. What
  :class:`~nngf_fem.flow.NaturalGradientFlow`, the expansion and the torch baselines
  use. Implemented by :class:`~nngf_fem.field.NeuralField` and
  :class:`~nngf_fem.parametric.ParametricField`.

An :class:`~nngf_fem.classical.FEControl` is a :class:`FunctionControl` but not a
:class:`NetworkControl`: its unknowns are distributed nodal values (each rank owns its
part), solved by the classical methods of :mod:`nngf_fem.classical`.

**Row layout.** ``values()`` returns this rank's owned values, point-major then
component (``local_size = n_points * value_size`` entries). For a FE representation the
points are the owned dofs of ``space`` and ``owned_rows()`` indexes them in a
Function's local array; for a quadrature representation the points are the quadrature
points of the owned cells.

**Layering.** This module imports nothing from the package but the MPI helpers'
types; the package's import layers are listed in :data:`LAYERS` and checked by the
test suite (``tests/test_layering.py``): a module may import only from lower layers.
"""

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Control", "FunctionControl", "NetworkControl", "Linearized", "LAYERS",
           "require"]

#: import layers of ``nngf_fem`` (module -> layer); a module imports only from lower layers
LAYERS: Mapping[str, int] = {
    "_backend": 0, "errors": 0, "_validate": 0, "control": 0,
    "mpi": 1,
    "solvers": 2, "models": 2, "observations": 2, "meshes": 2, "io": 2,
    "metrics": 3, "checkpoint": 3, "mlp_eval": 3,
    "field": 4, "gram": 5,
    "energies": 6,
    "pde": 7, "taylor": 7, "parametric": 7, "curvature": 7,
    "flow": 8,
    "expansion": 9, "baselines": 9,
    "classical.fe_control": 10, "classical.tao": 11, "classical.gauss_newton": 11,
    "classical": 12,
    "__init__": 13,
    "cli": 14,
}


@runtime_checkable
class Control(Protocol):
    """Every unknown: mesh, space and owned values (see module docstring)."""

    #: the communicator of the mesh
    comm: Any
    #: the ``dolfinx.mesh.Mesh`` the unknown lives on
    mesh: Any
    #: the ``fem.FunctionSpace`` holding the values (a quadrature space for quadrature)
    space: Any
    #: ``"fe"`` (values at the dofs of ``space``) or ``"quadrature"``
    representation: str
    #: components per point
    value_size: int
    #: geometric dimension of the mesh
    gdim: int

    @property
    def n_points(self) -> int:
        """Owned points on this rank."""
        ...

    @property
    def local_size(self) -> int:
        """Owned values on this rank (``n_points * value_size``)."""
        ...

    def values(self) -> np.ndarray:
        """Copy of the owned values (flat, point-major)."""
        ...

    def update(self) -> None:
        """Recompute the values (and the Functions the forms use) from the unknowns."""
        ...


@runtime_checkable
class FunctionControl(Control, Protocol):
    """An unknown that is one ``fem.Function`` in UFL forms (see module docstring)."""

    @property
    def ufl(self) -> Any:
        """The ``fem.Function`` to use in UFL forms (kept current by :meth:`update`)."""
        ...

    def owned_rows(self) -> np.ndarray:
        """Indices of the owned values in the local array of a Function on ``space``."""
        ...

    def read(self, function: Any) -> np.ndarray:
        """Owned values of a Function on ``space``."""
        ...

    def write(self, local_values: np.ndarray, function: Any) -> None:
        """Write owned values into a Function on ``space`` (ghosts are scattered)."""
        ...


@runtime_checkable
class Linearized(Protocol):
    """The Jacobian ``J = d values / d theta`` at fixed parameters, as products.

    ``n_rows`` local rows (values, then x-derivatives when linearized ``with_grad``);
    ``vjp`` results are summed over all ranks (identical on every rank).
    """

    n_rows: int

    def jvp(self, v: np.ndarray) -> np.ndarray:
        """``J v`` on the owned rows."""
        ...

    def vjp(self, w: np.ndarray) -> np.ndarray:
        """``J^T w``, allreduced."""
        ...

    def jvp_block(self, V: np.ndarray) -> np.ndarray:
        """``J V`` for a block ``V`` (P x l)."""
        ...

    def vjp_block(self, W: np.ndarray) -> np.ndarray:
        """``J^T W`` for a block ``W`` (rows x l), allreduced once."""
        ...


@runtime_checkable
class NetworkControl(Control, Protocol):
    """A torch-parameterized unknown with replicated parameters (see module docstring)."""

    #: the torch module (its parameters are ``theta``)
    module: Any

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector ``theta``."""
        ...

    def get_parameters(self) -> np.ndarray:
        """Copy of ``theta`` (float64, identical on all ranks)."""
        ...

    def set_parameters(self, theta: np.ndarray, update: bool = True) -> None:
        """Set ``theta`` (the same vector on every rank) and, by default, :meth:`update`."""
        ...

    def broadcast_parameters(self, root: int = 0, update: bool = True) -> float:
        """Copy the parameters of rank ``root`` to all ranks; returns the largest change."""
        ...

    def linearize(self, with_grad: bool = False,
                  cache_mb: float | None = None) -> Linearized:
        """The Jacobian at the current parameters (x-derivative rows with ``with_grad``)."""
        ...

    def network_inputs(self) -> Any:
        """The network's input rows at the owned points (a torch tensor; growth uses it)."""
        ...

    def output_sensitivity(self) -> np.ndarray:
        """``du/dN`` at the owned points, ``(n_points, value_size)`` (growth uses it)."""
        ...

    def default_metric(self) -> Any:
        """The Hilbert metric a flow uses when given none (e.g. ``H1(self)``)."""
        ...


def require(obj: object, protocol: type, who: str) -> None:
    """Raise a TypeError naming the missing members when ``obj`` lacks ``protocol``.

    Args:
        obj: the candidate control.
        protocol: :class:`Control`, :class:`FunctionControl` or :class:`NetworkControl`.
        who: what needs it (for the message), e.g. ``"NaturalGradientFlow"``.
    """
    if isinstance(obj, protocol):
        return
    members = [m for m in _members(protocol) if not hasattr(obj, m)]
    if protocol is FunctionControl and hasattr(obj, "samples"):  # a ParametricField
        raise TypeError(f"{who} needs a FunctionControl (one Function in the forms); a "
                        f"{type(obj).__name__} has one per sample: use "
                        f"nf.ProductMetric(field, nf.{who}, ...) for a metric, or build it "
                        "on field.samples[i]")
    hint = {
        NetworkControl: " (a NeuralField or ParametricField; an FEControl is solved with "
                        "nngf_fem.TaoSolver or nngf_fem.GaussNewtonCG)",
        FunctionControl: " (a NeuralField or FEControl: one Function in the forms)",
    }.get(protocol, "")
    raise TypeError(f"{who} needs a {protocol.__name__}{hint}; {type(obj).__name__} lacks "
                    f"{', '.join(members) or 'members of the protocol'}")


def _members(protocol: type) -> list[str]:
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        names += [n for n in getattr(klass, "__annotations__", {}) if n not in names]
        names += [n for n, v in vars(klass).items()
                  if not n.startswith("_") and (callable(v) or isinstance(v, property))
                  and n not in names]
    return names
