"""A torch network living on a DOLFINx mesh as a field that UFL forms can use.

A :class:`NeuralField` evaluates ``u(x) = lift(x) + factor(x) * T(N_theta(x, mu))`` at
the points of one of two representations:

* ``"fe"`` -- the dof coordinates of a Lagrange space ``Q_h`` (nodal interpolation,
  ``u_h = I_h u``); the metric is then a FE matrix ``A_H`` on ``Q_h``;
* ``"quadrature"`` -- the quadrature points of a given degree (a quadrature-element
  Function); metrics use the quadrature weights and torch x-derivatives.

``field.ufl`` is the DOLFINx Function holding the current values; put it in any UFL
form. The parameter Jacobian ``J = d values / d theta`` is available only as products
(:meth:`Linearization.jvp`, :meth:`Linearization.vjp`); :meth:`NeuralField.jacobian`
forms it explicitly for small problems and tests.

Parallel layout: the mesh is distributed, parameters are replicated on all ranks.
Each rank evaluates the network at its *owned* points only; ghost values are filled
by a forward scatter; parameter-space results (``J^T w``) are summed over ranks.

Flat parameter vectors follow ``module.named_parameters()`` order, each tensor
flattened row-major (``torch.nn.utils.parameters_to_vector`` order).
"""

from nngf_fem.mpi import allreduce_sum, raise_on_any

from collections.abc import Callable, Sequence

import basix
import basix.ufl
import numpy as np
import torch
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh
from mpi4py import MPI
from torch.func import functional_call, jacfwd, jacrev, vmap

__all__ = ["NeuralField", "Linearization"]

_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda y: y,
    "exp": torch.exp,
    "softplus": torch.nn.functional.softplus,
}


class NeuralField:
    """A PyTorch network evaluated on a DOLFINx mesh.

    Args:
        domain: a ``dolfinx.mesh.Mesh`` or, for the FE representation, a Lagrange
            ``FunctionSpace`` ``Q_h`` to interpolate into.
        module: ``torch.nn.Module`` (float64) mapping ``(n, gdim [+ n_mu])`` to
            ``(n, m)`` with ``m`` the value size.
        transform: output transform ``T``: ``"identity"``, ``"exp"``, ``"softplus"`` or
            a callable on tensors (use exp/softplus for positive coefficients).
        representation: ``"fe"`` (nodal values in ``Q_h``) or ``"quadrature"``.
        element: element of ``Q_h`` when ``domain`` is a mesh (default P1 scalar,
            ``("Lagrange", 1, (m,))`` is used for ``m > 1``).
        quadrature_degree: degree of the quadrature rule for ``"quadrature"``.
        mu: optional fixed extra inputs appended to every point (parametric fields).
        factor: optional callable ``x -> (n,)`` tensor multiplying the output (e.g. a
            distance function vanishing on the Dirichlet boundary).
        lift: optional callable ``x -> (n,)`` or ``(n, m)`` tensor added to the output.
        name: name of the DOLFINx Function.
    """

    def __init__(
        self,
        domain: dmesh.Mesh | fem.FunctionSpace,
        module: torch.nn.Module,
        *,
        transform: str | Callable[[torch.Tensor], torch.Tensor] = "identity",
        representation: str = "fe",
        element: tuple | None = None,
        quadrature_degree: int = 2,
        mu: Sequence[float] | np.ndarray | None = None,
        factor: Callable[[torch.Tensor], torch.Tensor] | None = None,
        lift: Callable[[torch.Tensor], torch.Tensor] | None = None,
        name: str = "u",
    ):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if representation not in ("fe", "quadrature"):
            raise ValueError(
                f"representation={representation!r} is not known; allowed: 'fe', 'quadrature'"
            )
        if isinstance(transform, str):
            if transform not in _TRANSFORMS:
                raise ValueError(
                    f"transform={transform!r} is not known; allowed: {sorted(_TRANSFORMS)} "
                    "or a callable"
                )
            self.transform_name, self._transform = transform, _TRANSFORMS[transform]
        elif callable(transform):
            self.transform_name = getattr(transform, "__name__", "custom")
            self._transform = transform
        else:
            raise TypeError(f"transform must be a string or a callable, got {transform!r}")
        for p in module.parameters():
            if p.dtype != torch.float64:
                raise TypeError(
                    f"module parameters must be float64 (got {p.dtype}); build it with "
                    "dtype=torch.float64 or call module.double()"
                )

        self.module = module
        self.representation = representation
        self.factor, self.lift = factor, lift
        self._mu = None if mu is None else torch.as_tensor(np.asarray(mu, dtype=np.float64))
        if isinstance(domain, fem.FunctionSpace):
            if representation != "fe":
                raise ValueError(
                    "pass a mesh (not a FunctionSpace) for representation='quadrature'"
                )
            self.mesh = domain.mesh
        elif isinstance(domain, dmesh.Mesh):
            self.mesh = domain
        else:
            raise TypeError(f"domain must be a dolfinx Mesh or FunctionSpace, got {type(domain)}")
        self.comm: MPI.Comm = self.mesh.comm
        self.gdim = self.mesh.geometry.dim

        m = self._probe_value_size()
        self.value_size = m
        if representation == "fe":
            if isinstance(domain, fem.FunctionSpace):
                V = domain
            else:
                el = element or (("Lagrange", 1) if m == 1 else ("Lagrange", 1, (m,)))
                V = fem.functionspace(self.mesh, el)
            self._setup_fe(V)
        else:
            if not isinstance(quadrature_degree, int) or quadrature_degree < 0:
                raise ValueError(
                    f"quadrature_degree must be an int >= 0, got {quadrature_degree!r}"
                )
            self.quadrature_degree = quadrature_degree
            self._setup_quadrature(quadrature_degree)
        self.function = fem.Function(self.space, name=name)
        self.update()

    # ------------------------------------------------------------------ set-up
    def _probe_value_size(self) -> int:
        x = torch.full((1, self.gdim), 0.5, dtype=torch.float64)
        try:
            y = self.module(self._inputs(x))
        except Exception as err:  # noqa: BLE001 - re-raised with context
            n_in = self.gdim + (0 if self._mu is None else self._mu.numel())
            raise ValueError(
                f"module cannot be evaluated on points of shape (n, {n_in}) "
                f"(gdim={self.gdim}{'' if self._mu is None else ' + len(mu)'}): {err}"
            ) from err
        if y.ndim != 2 or y.shape[0] != 1:
            raise ValueError(f"module must map (n, d) to (n, m); got output shape {tuple(y.shape)}")
        return int(y.shape[1])

    def _setup_fe(self, V: fem.FunctionSpace) -> None:
        if V.mesh is not self.mesh:
            raise ValueError("the FunctionSpace belongs to a different mesh than the field")
        if not V.element.interpolation_ident:
            raise ValueError(
                "the FE representation needs a Lagrange-type space (point evaluation at dof "
                f"coordinates); got element {V.ufl_element()}"
            )
        bs = V.dofmap.index_map_bs
        if bs != self.value_size:
            raise ValueError(
                f"network output size {self.value_size} does not match the space's value size {bs}"
            )
        n = V.dofmap.index_map.size_local
        self.space = V
        self._points_np = V.tabulate_dof_coordinates()[:n, : self.gdim].copy()
        self._dofs = np.arange(n, dtype=np.int64)
        self.weights = None

    def _setup_quadrature(self, degree: int) -> None:
        X, w = basix.make_quadrature(self.mesh.basix_cell(), degree)
        shape = () if self.value_size == 1 else (self.value_size,)
        qel = basix.ufl.quadrature_element(self.mesh.basix_cell(), value_shape=shape, points=X,
                                           weights=w)
        self.space = fem.functionspace(self.mesh, qel)
        tdim = self.mesh.topology.dim
        ncell = self.mesh.topology.index_map(tdim).size_local
        cells = np.arange(ncell, dtype=np.int32)
        xq = fem.Expression(ufl.SpatialCoordinate(self.mesh), X).eval(self.mesh, cells)
        detj = fem.Expression(abs(ufl.JacobianDeterminant(self.mesh)), X).eval(self.mesh, cells)
        dofs = self.space.dofmap.list[:ncell].reshape(-1).astype(np.int64)
        nown = self.space.dofmap.index_map.size_local
        assert dofs.size == 0 or dofs.max() < nown, "quadrature dofs of owned cells must be owned"
        self._points_np = np.ascontiguousarray(xq.reshape(-1, self.gdim))
        self._dofs = dofs
        self.quadrature_points_ref, self.quadrature_weights_ref = X, w
        self.weights = (detj.reshape(ncell, -1) * w[None, :]).reshape(-1)

    # ------------------------------------------------------------ properties
    @property
    def ufl(self) -> fem.Function:
        """The DOLFINx Function with the current values (use it in UFL forms)."""
        return self.function

    @property
    def points(self) -> np.ndarray:
        """Owned evaluation points, shape ``(n_points, gdim)``."""
        return self._points_np

    @property
    def n_points(self) -> int:
        """Number of owned evaluation points on this rank."""
        return self._points_np.shape[0]

    @property
    def local_size(self) -> int:
        """Owned values on this rank: ``n_points * value_size``."""
        return self.n_points * self.value_size

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The network's parameters, in flat-vector order."""
        return list(self.module.parameters())

    @property
    def num_params(self) -> int:
        """Number of network parameters P."""
        return sum(p.numel() for p in self.module.parameters())

    @property
    def mu(self) -> np.ndarray | None:
        """Extra inputs appended to each point (parametric fields)."""
        return None if self._mu is None else self._mu.numpy().copy()

    def set_mu(self, mu: Sequence[float] | np.ndarray) -> None:
        """Change the extra inputs and refresh the values."""
        mu = np.asarray(mu, dtype=np.float64)
        if self._mu is None or mu.shape != tuple(self._mu.shape):
            want = None if self._mu is None else tuple(self._mu.shape)
            raise ValueError(f"mu must have shape {want}, got {mu.shape}")
        self._mu = torch.as_tensor(mu)
        self.update()

    # --------------------------------------------------------- parameters
    def get_parameters(self) -> np.ndarray:
        """Flat copy of the parameters (see module docstring for the order)."""
        with torch.no_grad():
            return torch.nn.utils.parameters_to_vector(self.module.parameters()).numpy().copy()

    def set_parameters(self, theta: np.ndarray, update: bool = True) -> None:
        """Set the parameters from a flat vector and (by default) refresh the values."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.num_params,):
            raise ValueError(
                f"parameter vector must have shape ({self.num_params},), got {theta.shape}"
            )
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.from_numpy(theta.copy()), self.module.parameters()
            )
        if update:
            self.update()

    def unflatten(self, v: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat parameter-space vector into a dict shaped like the parameters."""
        v = torch.as_tensor(np.asarray(v, dtype=np.float64)) if not torch.is_tensor(v) else v
        if v.shape != (self.num_params,):
            raise ValueError(f"vector must have shape ({self.num_params},), got {tuple(v.shape)}")
        out, i = {}, 0
        for name, p in self.module.named_parameters():
            out[name] = v[i : i + p.numel()].view_as(p)
            i += p.numel()
        return out

    @staticmethod
    def flatten(d: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten`."""
        return torch.cat([t.reshape(-1) for t in d.values()])

    def param_dict(self) -> dict[str, torch.Tensor]:
        """Detached current parameters by name."""
        return {n: p.detach() for n, p in self.module.named_parameters()}

    # --------------------------------------------------------- evaluation
    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self._mu is None:
            return x
        return torch.cat([x, self._mu.expand(x.shape[0], -1)], dim=1)

    def evaluate(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``u(x)`` for given parameters; ``x`` of shape ``(n, gdim)``, result ``(n, m)``."""
        return self.post(functional_call(self.module, params, (self._inputs(x),)), x)

    def post(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map raw network outputs ``N(x)`` to field values ``lift + factor * T(N)``."""
        y = self._transform(y)
        if self.factor is not None:
            f = self.factor(x)
            y = y * (f if f.ndim == 2 else f[:, None])
        if self.lift is not None:
            g = self.lift(x)
            y = y + (g if g.ndim == 2 else g[:, None])
        return y

    def evaluate_with_grad(
        self, params: dict[str, torch.Tensor], x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values ``(n, m)`` and x-derivatives ``(n, m, gdim)`` (torch autograd)."""

        def single(xi):
            return self.evaluate(params, xi[None, :])[0]

        return self.evaluate(params, x), vmap(jacrev(single))(x)

    def output_sensitivity(self) -> np.ndarray:
        """``du/dN`` at the owned points, shape ``(n_points, m)`` (chain rule of ``post``)."""
        x = self._torch_points()
        with torch.no_grad():
            raw = self.module(self._inputs(x))
        raw = raw.clone().requires_grad_(True)
        (s,) = torch.autograd.grad(self.post(raw, x).sum(), raw)
        return s.numpy().copy()

    def _torch_points(self) -> torch.Tensor:
        return torch.from_numpy(self._points_np)

    def values(self) -> np.ndarray:
        """Current values at the owned points, flat ``(n_points * m,)`` (point-major)."""
        with torch.no_grad():
            return self.evaluate(self.param_dict(), self._torch_points()).reshape(-1).numpy().copy()

    def values_and_grads(self) -> tuple[np.ndarray, np.ndarray]:
        """Current values ``(n*m,)`` and x-derivatives ``(n*m*gdim,)`` at the owned points."""
        with torch.no_grad():
            v, g = self.evaluate_with_grad(self.param_dict(), self._torch_points())
        return v.reshape(-1).numpy().copy(), g.reshape(-1).numpy().copy()

    def update(self) -> None:
        """Evaluate the network and write the values into :attr:`function` (ghosts included)."""
        vals = self.values()
        raise_on_any(
            self.comm, not np.all(np.isfinite(vals)),
            "the network produced non-finite values (NaN/Inf) on the mesh", exc=FloatingPointError,
        )
        self.write(vals, self.function)

    def write(self, local_values: np.ndarray, function: fem.Function) -> None:
        """Write owned point values (flat, point-major) into ``function`` and scatter ghosts."""
        m = self.value_size
        arr = function.x.array.reshape(-1, m)
        arr[self._dofs] = np.asarray(local_values).reshape(-1, m)
        function.x.scatter_forward()

    def read(self, function: fem.Function) -> np.ndarray:
        """Owned point values of a Function on :attr:`space` (flat, point-major)."""
        return function.x.array.reshape(-1, self.value_size)[self._dofs].reshape(-1).copy()

    def owned_rows(self) -> np.ndarray:
        """Indices of this rank's values in the local array of a space Function/Vec."""
        m = self.value_size
        return (self._dofs[:, None] * m + np.arange(m)[None, :]).reshape(-1)

    # ------------------------------------------------------ derivatives
    def flat_evaluator(self, with_grad: bool = False) -> Callable[[dict], torch.Tensor]:
        """``params -> flat values`` at the owned points (x-derivative rows appended).

        The row layout of :meth:`jacobian` and :class:`Linearization`.
        """
        x = self._torch_points()

        def f(p):
            if with_grad:
                v, g = self.evaluate_with_grad(p, x)
                return torch.cat([v.reshape(-1), g.reshape(-1)])
            return self.evaluate(p, x).reshape(-1)

        return f

    def linearize(self, with_grad: bool = False) -> "Linearization":
        """Linearization at the current parameters (J v and J^T w products).

        Args:
            with_grad: also differentiate the x-derivatives of the field (quadrature H1).
        """
        return Linearization(self, with_grad)

    def jacobian(self, with_grad: bool = False) -> np.ndarray:
        """Dense local Jacobian ``(rows, P)`` of the owned values (small problems only).

        With ``with_grad`` the rows of the x-derivatives are appended (point-major,
        then component, then direction).
        """
        params = self.param_dict()
        f = self.flat_evaluator(with_grad)
        rows = self.local_size * (1 + (self.gdim if with_grad else 0))
        jac = (jacfwd if self.num_params < rows else jacrev)(f)(params)
        return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], dim=1).numpy()


class Linearization:
    """The parameter Jacobian ``J`` of a :class:`NeuralField` at fixed parameters, as products.

    ``jvp(v)`` returns ``J v`` at the owned points; ``vjp(w)`` returns ``J^T w`` summed
    over all ranks (identical on every rank). The reverse-mode graph is built once
    and reused by every ``vjp`` (cheap repeated products inside a Krylov solve).
    """

    def __init__(self, field: NeuralField, with_grad: bool = False):
        self.field = field
        self.with_grad = with_grad
        self._params = field.param_dict()
        f = field.flat_evaluator(with_grad)
        self._f = f
        out, self._vjp_fn = torch.func.vjp(f, self._params)
        self.values = out.detach().numpy()
        self.n_rows = out.shape[0]

    def jvp(self, v: np.ndarray) -> np.ndarray:
        """``J v`` for a flat parameter-space vector ``v``; rows as :meth:`NeuralField.jacobian`."""
        tangent = self.field.unflatten(v)
        _, jv = torch.func.jvp(self._f, (self._params,), (tangent,))
        return jv.detach().numpy()

    def vjp(self, w: np.ndarray) -> np.ndarray:
        """``J^T w`` (allreduced over ranks) for ``w`` with one entry per local row."""
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (self.n_rows,):
            raise ValueError(f"w must have shape ({self.n_rows},), got {w.shape}")
        (g,) = self._vjp_fn(torch.from_numpy(w))
        local = NeuralField.flatten(g).detach().numpy()
        return allreduce_sum(self.field.comm, local)
