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

import time
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
        #: seconds spent evaluating the network in :meth:`update` (benchmarks)
        self.eval_seconds = 0.0
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
        t0 = time.perf_counter()
        vals = self.values()
        self.eval_seconds += time.perf_counter() - t0
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

    def _linear_layers_jacobian(self) -> np.ndarray | None:
        """``J`` of the values from one forward and ``m`` backward passes, or None.

        For networks whose parameters all sit in ``nn.Linear`` layers, each used once
        (MLP, ResMLP and their grown versions): with the layer input ``h`` and the
        backpropagated output sensitivity ``delta`` of every point (points are
        independent, so one backward pass of the summed output gives all of them), the
        per-point derivatives are ``delta (x) h`` for the weight and ``delta`` for the
        bias. Returns None when the module is of another kind (the caller then uses
        ``vmap``).
        """
        linears = {name: mod for name, mod in self.module.named_modules()
                   if isinstance(mod, torch.nn.Linear)}
        slots = {}
        for name, mod in linears.items():
            for kind in ("weight", "bias"):
                if getattr(mod, kind) is not None:
                    slots[f"{name}.{kind}" if name else kind] = (name, kind)
        named = list(self.module.named_parameters())
        if not named or any(n not in slots for n, _ in named):
            return None
        seen: dict[str, list] = {name: [] for name in linears}
        handles = [mod.register_forward_hook(
            lambda mod, inp, out, name=name: seen[name].append((inp[0].detach(), out)))
            for name, mod in linears.items()]
        try:
            with torch.enable_grad():
                x = self._torch_points()
                u = self.post(self.module(self._inputs(x)), x)
        finally:
            for h in handles:
                h.remove()
        used = [name for name in linears if seen[name]]
        if any(len(seen[name]) != 1 for name in used):
            return None  # a layer applied twice: per-point products do not separate
        n, m = x.shape[0], self.value_size
        J = np.empty((n, m, self.num_params))
        outs = [seen[name][0][1] for name in used]
        for c in range(m):
            deltas = dict(zip(used, torch.autograd.grad(
                u[:, c].sum(), outs, retain_graph=c < m - 1, allow_unused=True), strict=True))
            col = 0
            for pname, p in named:
                lname, kind = slots[pname]
                d = deltas.get(lname)
                if d is None:  # layer not on the path to the output
                    J[:, c, col:col + p.numel()] = 0.0
                elif kind == "bias":
                    J[:, c, col:col + p.numel()] = d.numpy()
                else:
                    h = seen[lname][0][0]
                    J[:, c, col:col + p.numel()] = (
                        d[:, :, None] * h[:, None, :]).reshape(n, -1).numpy()
                col += p.numel()
        return J.reshape(n * m, -1)

    def linearize(self, with_grad: bool = False,
                  cache_mb: float | None = None) -> "Linearization":
        """Linearization at the current parameters (J v and J^T w products).

        Args:
            with_grad: also differentiate the x-derivatives of the field (quadrature H1).
            cache_mb: budget of an explicit local Jacobian (default
                :data:`JACOBIAN_CACHE_MB`; 0 = always matrix-free).
        """
        return Linearization(self, with_grad,
                             JACOBIAN_CACHE_MB if cache_mb is None else cache_mb)

    def jacobian(self, with_grad: bool = False) -> np.ndarray:
        """Dense local Jacobian ``(rows, P)`` of the owned values (small problems only).

        With ``with_grad`` the rows of the x-derivatives are appended (point-major,
        then component, then direction).
        """
        Jv, Jg = self.jacobian_parts(with_grad)
        return Jv if Jg is None else np.concatenate([Jv, Jg])

    def jacobian_parts(self, with_grad: bool = False, chunk_mb: float = 64.0
                       ) -> tuple[np.ndarray, np.ndarray | None]:
        """Value rows ``(n m, P)`` and x-derivative rows ``(n m gdim, P)`` (or None) of ``J``.

        Per-point parameter gradients, ``vmap`` over points of ``jacrev`` of a one-point
        evaluation (one batched backward pass, not one pass per row or column), in
        chunks of about ``chunk_mb`` MiB. Falls back to ``jacfwd``/``jacrev`` of the flat
        evaluator for modules that ``vmap`` cannot batch.
        """
        if not with_grad:
            J = self._linear_layers_jacobian()
            if J is not None:
                return J, None
        params = self.param_dict()
        m, gd, P = self.value_size, self.gdim, self.num_params
        width = m * (1 + (gd if with_grad else 0))

        def one(p, xi):
            v = self.evaluate(p, xi[None, :])[0]
            if not with_grad:
                return v
            dx = jacrev(lambda xx: self.evaluate(p, xx[None, :])[0])(xi)
            return torch.cat([v, dx.reshape(-1)])

        x = self._torch_points()
        per_point = vmap(jacrev(one), in_dims=(None, 0))
        chunk = max(1, int(chunk_mb * 2**20 / (8 * max(1, width * P))))
        try:
            blocks = []
            for i in range(0, max(x.shape[0], 1), chunk):
                jac = per_point(params, x[i : i + chunk])
                blocks.append(torch.cat([jac[n].reshape(jac[n].shape[0], width, -1)
                                         for n in params], dim=2))
            J = torch.cat(blocks).numpy() if x.shape[0] else np.zeros((0, width, P))
        except RuntimeError:  # not vmappable (e.g. data-dependent control flow)
            f = self.flat_evaluator(with_grad)
            rows = self.local_size * (1 + (gd if with_grad else 0))
            jac = (jacfwd if P < rows else jacrev)(f)(params)
            Jf = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], dim=1).numpy()
            n = self.local_size
            return Jf[:n], (Jf[n:] if with_grad else None)
        Jv = np.ascontiguousarray(J[:, :m].reshape(-1, P))
        Jg = np.ascontiguousarray(J[:, m:].reshape(-1, P)) if with_grad else None
        return Jv, Jg


#: Linearizations keep an explicit local Jacobian when it needs at most this many MiB
JACOBIAN_CACHE_MB = 512.0


class Linearization:
    """The parameter Jacobian ``J`` of a :class:`NeuralField` at fixed parameters, as products.

    ``jvp(v)`` returns ``J v`` at the owned points; ``vjp(w)`` returns ``J^T w`` summed
    over all ranks (identical on every rank). When the local ``J`` (rows x P) fits in
    ``cache_mb`` MiB it is formed once (:meth:`NeuralField.jacobian_parts`, one batched
    backward pass) and every product is a BLAS call; otherwise products are torch
    forward/reverse-mode passes, the reverse-mode graph built once and reused. The Gram
    matrix ``G`` itself is never formed on either path.

    Args:
        field: the neural (or parametric) field.
        with_grad: also differentiate the x-derivatives of the field (quadrature H1).
        cache_mb: memory budget of an explicit local Jacobian (0: always matrix-free).
    """

    def __init__(self, field: NeuralField, with_grad: bool = False,
                 cache_mb: float = JACOBIAN_CACHE_MB):
        self.field = field
        self.with_grad = with_grad
        P = field.num_params
        self.n_rows = field.local_size * (1 + (field.gdim if with_grad else 0))
        self.J: np.ndarray | None = None
        self._values: np.ndarray | None = None
        if self.n_rows * P * 8 <= cache_mb * 2**20:
            self.J = field.jacobian(with_grad)
            return
        self._params = field.param_dict()
        self._f = field.flat_evaluator(with_grad)
        _, self._vjp_fn = torch.func.vjp(self._f, self._params)

    @property
    def values(self) -> np.ndarray:
        """The linearized rows' values at the linearization point (values, x-derivatives)."""
        if self._values is None:
            with torch.no_grad():
                self._values = self.field.flat_evaluator(self.with_grad)(
                    self.field.param_dict()).numpy()
        return self._values

    @property
    def cached(self) -> bool:
        """Whether the local Jacobian is held explicitly."""
        return self.J is not None

    def jvp(self, v: np.ndarray) -> np.ndarray:
        """``J v`` for a flat parameter-space vector ``v``; rows as :meth:`NeuralField.jacobian`."""
        if self.J is not None:
            return self.J @ np.asarray(v, dtype=np.float64)
        tangent = self.field.unflatten(v)
        _, jv = torch.func.jvp(self._f, (self._params,), (tangent,))
        return jv.detach().numpy()

    def vjp(self, w: np.ndarray) -> np.ndarray:
        """``J^T w`` (allreduced over ranks) for ``w`` with one entry per local row."""
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (self.n_rows,):
            raise ValueError(f"w must have shape ({self.n_rows},), got {w.shape}")
        if self.J is not None:
            return allreduce_sum(self.field.comm, self.J.T @ w)
        (g,) = self._vjp_fn(torch.from_numpy(w))
        local = NeuralField.flatten(g).detach().numpy()
        return allreduce_sum(self.field.comm, local)

    def jvp_block(self, V: np.ndarray) -> np.ndarray:
        """``J V`` for a block of parameter-space vectors ``V`` (P x l)."""
        if self.J is not None:
            return self.J @ V
        return np.column_stack([self.jvp(V[:, j]) for j in range(V.shape[1])])

    def vjp_block(self, W: np.ndarray) -> np.ndarray:
        """``J^T W`` (allreduced once) for a block ``W`` (local rows x l)."""
        if W.shape[0] != self.n_rows:
            raise ValueError(f"W must have {self.n_rows} rows, got {W.shape}")
        if self.J is not None:
            return allreduce_sum(self.field.comm, self.J.T @ W)
        return np.column_stack([self.vjp(W[:, j]) for j in range(W.shape[1])])
