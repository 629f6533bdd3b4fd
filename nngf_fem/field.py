"""A torch network living on a DOLFINx mesh as a field that UFL forms can use.

A :class:`NeuralField` evaluates ``u(x) = lift(x) + factor(x) * T(N_theta(x, mu) + o(x))``
at the points of one of two representations (``o`` is a fixed, non-trainable offset that
makes the field start exactly at a non-constant initial guess; zero otherwise):

* ``"fe"`` -- the dof coordinates of a Lagrange space ``Q_h`` (nodal interpolation,
  ``u_h = I_h u``); the metric is then a FE matrix ``A_H`` on ``Q_h``;
* ``"quadrature"`` -- the quadrature points of a given degree (a quadrature-element
  Function); metrics use the quadrature weights and torch x-derivatives.

``field.ufl`` is the DOLFINx Function holding the current values; put it in any UFL
form. The parameter Jacobian ``J = d values / d theta`` is available only as products
(:meth:`Linearization.jvp`, :meth:`Linearization.vjp`); :meth:`NeuralField.jacobian`
forms it explicitly for small problems and tests.

Parallel layout: the mesh is distributed, parameters are replicated on all ranks --
identical by construction: a field copies the module's parameters and buffers from rank
0 when it is created (:meth:`NeuralField.broadcast_parameters`, also the call to make
after changing the module on the ranks separately). Each rank evaluates the network at
its *owned* points only; ghost values are filled by a forward scatter; parameter-space
results (``J^T w``) are summed over ranks.

Flat parameter vectors follow ``module.named_parameters()`` order, each tensor
flattened row-major (``torch.nn.utils.parameters_to_vector`` order).
"""

from nngf_fem.meshes import check_mesh
from nngf_fem.metrics import H1
from nngf_fem.mlp_eval import MLPEvaluator
from nngf_fem.mpi import allreduce_sum, raise_on_any

import numbers
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


def _softplus(y: torch.Tensor) -> torch.Tensor:
    # threshold 50 (not torch's float32-minded 20): log1p(exp(y)) is exact to float64
    # round-off up to there, and y itself beyond (exp(-50) ~ 2e-22)
    return torch.nn.functional.softplus(y, threshold=50.0)


def _softplus_inverse(k: torch.Tensor) -> torch.Tensor:
    # log(expm1(k)) = k + log(1 - exp(-k)), accurate for small and large k
    return k + torch.log(-torch.expm1(-k))


_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda y: y,
    "exp": torch.exp,
    "softplus": _softplus,
}
_INVERSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda k: k,
    "exp": torch.log,
    "softplus": _softplus_inverse,
}
#: transforms whose range is (0, inf): the initial guess must be positive
_POSITIVE = ("exp", "softplus")


def is_constant_initial(initial: object) -> bool:
    """Whether ``initial`` is a constant initial guess (a real number or a 1-d list of them)."""
    if isinstance(initial, bool | str) or initial is None:
        return False
    if isinstance(initial, numbers.Real):
        return True
    if isinstance(initial, fem.Function | ufl.core.expr.Expr) or callable(initial):
        return False
    try:
        a = np.asarray(initial)
    except Exception:  # noqa: BLE001 - not array-like
        return False
    return a.ndim <= 1 and a.size > 0 and (a.dtype.kind in "fiu")


def output_layer(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The final ``nn.Linear`` of ``module`` whose output is the module's output, or None.

    ``module.output_layer`` (the growth protocol of :mod:`nngf_fem.models`), the last entry
    of an ``nn.Sequential``, or the module itself when it is an ``nn.Linear``.
    """
    layer = getattr(module, "output_layer", None)
    if isinstance(layer, torch.nn.Linear):
        return layer
    if isinstance(module, torch.nn.Sequential) and len(module) and isinstance(
            module[-1], torch.nn.Linear):
        return module[-1]
    if isinstance(module, torch.nn.Linear):
        return module
    return None


class NeuralField:
    """A PyTorch network evaluated on a DOLFINx mesh.

    The field is ``u(x) = lift(x) + factor(x) * T(N_theta(x, mu) + o(x))`` at the points
    of its representation, with ``o`` a fixed (non-trainable) offset, zero unless a
    non-constant initial guess needs it.

    **The start.** What the field is right after construction:

    * ``initial=k0`` given: the module's output layer (``module.output_layer``, the last
      layer of an ``nn.Sequential``, or an ``nn.Linear`` module) gets zero weights, so
      ``N_theta = bias`` and the field equals ``k0`` at its points to round-off
      (relative 1e-14), whatever the hidden layers hold:

      - a number (or one number per component): the output bias is ``T^{-1}(k0)``
        (the offset when the output layer has no bias), and ``o = 0``;
      - a callable ``x -> values`` on a numpy array of points ``(n, gdim)`` returning
        ``(n,)`` or ``(n, m)``, applied point by point: bias 0 and
        ``o(x) = T^{-1}(k0(x))`` (also at other points :meth:`evaluate` is asked for);
      - a ``fem.Function`` (any space on the field's mesh) or a UFL expression on that
        mesh: bias 0 and ``o = T^{-1}(k0)`` at the field's points -- the FE
        representation interpolates ``k0`` into the field's space (the field is then
        ``I_h k0``), the quadrature representation evaluates it at the quadrature
        points (``fem.Expression``); such an offset is known at the field's points only.

      ``T^{-1}`` is ``log`` for ``"exp"`` and ``log(expm1(k))`` for ``"softplus"`` (then
      ``k0 > 0`` is required), the identity for ``"identity"``; a callable ``transform``
      needs ``inverse_transform``. ``initial`` cannot be combined with ``factor``/``lift``
      (put the guess into ``lift`` instead). The x-derivatives of the field (quadrature
      H1 metrics) need the gradient of ``o``: a Function's (or UFL expression's) gradient at
      the quadrature points, or the torch gradient of a callable that also accepts torch
      tensors; otherwise they raise ``NotImplementedError``.
    * ``initial=None`` (default) and ``transform="exp"``: as ``initial=1.0`` -- zero output
      layer, so ``T(N) = 1`` (``u = 1``; ``u = lift + factor`` with a factor or lift). A
      module without an output layer keeps its own parameters.
    * ``initial=None`` with another transform, or ``initial="module"``: the module's own
      parameters (e.g. PyTorch's random initialization, or a trained network -- use
      ``initial="module"`` to keep a trained network with ``transform="exp"``).

    The zero output layer makes the gradient of the hidden parameters zero at the start;
    the natural-gradient flow's damping handles the singular Gram matrix, and the first
    steps move the output layer.

    In every case the module's parameters and buffers are first copied from rank 0 of
    the mesh's communicator (:meth:`broadcast_parameters`), so that an unseeded network
    is identical on all ranks.

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
        initial: initial guess of the field value ``u`` (see "The start" above): a
            number, one number per component, a callable, a ``fem.Function`` or UFL
            expression on the mesh, ``"module"`` (keep the module's parameters) or None.
        inverse_transform: ``T^{-1}`` on tensors, needed with ``initial`` for a callable
            ``transform`` (elementwise; differentiable by torch for x-derivatives).

    Raises:
        ValueError: (on all ranks) bad arguments, an initial guess with NaN/Inf values,
            outside the range of ``T``, of the wrong shape, on another mesh, or different
            between ranks (constants).
        TypeError: ``initial`` of an unsupported type, or with a module without an
            output layer.
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
        initial: object = None,
        inverse_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
            if inverse_transform is not None:
                raise ValueError(f"inverse_transform is for a callable transform; "
                                 f"transform={transform!r} has its own inverse")
            self._inverse = _INVERSES[transform]
        elif callable(transform):
            self.transform_name = getattr(transform, "__name__", "custom")
            self._transform = transform
            if inverse_transform is not None and not callable(inverse_transform):
                raise TypeError(f"inverse_transform must be a callable, got {inverse_transform!r}")
            self._inverse = inverse_transform
        else:
            raise TypeError(f"transform must be a string or a callable, got {transform!r}")
        self._transform_key = transform if isinstance(transform, str) else None
        #: the transform's name when it was given by name (None for a callable)
        self.named_transform = self._transform_key
        self._evaluator: tuple[tuple, list, MLPEvaluator | None] | None = None
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
        if not getattr(self.mesh, "_nngf_fem_checked", False):  # NaN coordinates, flat cells
            check_mesh(self.mesh, source="the field's mesh")
            try:
                self.mesh._nngf_fem_checked = True
            except AttributeError:  # pragma: no cover - a mesh type without attributes
                pass
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
        self._points_t = torch.from_numpy(self._points_np)
        # the fixed offset o: None, a constant (1, m) row, or (n_points, m) rows
        self._offset: torch.Tensor | None = None
        self._offset_grad: torch.Tensor | None = None  # (n_points, m, gdim) where known
        self._offset_fn: Callable[[np.ndarray], torch.Tensor] | None = None  # at other points
        self._offset_grad_fn: Callable[[np.ndarray], torch.Tensor] | None = None
        self._offset_grad_missing = ""  # why x-derivatives of o are unavailable
        #: how the field started: "constant", "callable", "function", "default" or "module"
        self.initial_kind = "module"
        self.broadcast_parameters(update=False)
        self._set_initial(initial)
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

    # ------------------------------------------------------ initial guess
    def _set_initial(self, initial: object) -> None:
        """Apply the start described in the class docstring (collective)."""
        m, comm = self.value_size, self.comm
        if isinstance(initial, str):
            if initial != "module":
                raise ValueError(f"initial={initial!r} is not known; give a number, a callable, "
                                 "a fem.Function, 'module' or None")
            return
        layer = output_layer(self.module)
        if initial is None:
            if self._transform_key == "exp" and layer is not None:
                self._zero_output_layer(layer, np.zeros(m))  # T^{-1}(1) = 0
                self.initial_kind = "default"
            return
        if isinstance(initial, bool):
            raise TypeError(f"initial must be a number, a callable or a fem.Function, "
                            f"got {initial!r}")
        if self.factor is not None or self.lift is not None:
            raise ValueError("initial= cannot be combined with factor= or lift= (the start "
                             "would be (k0 - lift) / factor); put the initial guess into lift")
        if self._inverse is None:
            raise ValueError(f"initial= with the callable transform {self.transform_name!r} "
                             "needs inverse_transform= (T^{-1} on tensors)")
        if layer is None:
            raise TypeError(
                f"initial= needs a module whose output is an nn.Linear layer (an "
                f"'output_layer' attribute, the last entry of an nn.Sequential, or an "
                f"nn.Linear itself) to set to zero; {type(self.module).__name__} has none")
        if layer.out_features != m:
            raise TypeError(f"the output layer has {layer.out_features} outputs, the field "
                            f"value size is {m}")
        if is_constant_initial(initial):
            k0 = np.asarray(initial, dtype=np.float64).reshape(-1)
            if k0.size == 1:
                k0 = np.full(m, k0[0])
            want = "1 value" if m == 1 else f"1 or {m} values (one per component)"
            raise_on_any(comm, k0.shape != (m,),
                         f"a constant initial guess needs {want}, got {k0.size}")
            ref = comm.bcast(k0, root=0)
            raise_on_any(comm, not np.array_equal(ref, k0, equal_nan=True),
                         "initial differs between MPI ranks (pass the same value on every rank)")
            target = self._inverse_values(k0[None, :])[0]
            if layer.bias is not None:
                self._zero_output_layer(layer, target)
            else:
                self._zero_output_layer(layer, None)
                c = torch.from_numpy(target.copy())[None, :]
                self._offset = c
                self._offset_fn = lambda x: c.expand(x.shape[0], -1)
                zero = torch.zeros(1, m, self.gdim, dtype=torch.float64)
                self._offset_grad = zero
                self._offset_grad_fn = lambda x: zero.expand(x.shape[0], -1, -1)
            self.initial_kind = "constant"
            expected = np.broadcast_to(k0, (self.n_points, m))
        elif isinstance(initial, fem.Function | ufl.core.expr.Expr):
            expected = self._initial_from_ufl(initial)
            self._zero_output_layer(layer, np.zeros(m))
            self.initial_kind = "function"
        elif callable(initial):
            expected = self._initial_from_callable(initial)
            self._zero_output_layer(layer, np.zeros(m))
            self.initial_kind = "callable"
        else:
            raise TypeError(f"initial must be a number, a callable, a fem.Function, 'module' or "
                            f"None, got {type(initial).__name__}")
        vals = self.values().reshape(-1, m)
        dev = np.abs(vals - expected) / np.maximum(np.abs(expected), 1e-300)
        dev_max = comm.allreduce(float(dev.max()) if dev.size else 0.0, op=MPI.MAX)
        raise_on_any(comm, not dev_max <= 1e-10,
                     f"the field does not start at the initial guess (relative deviation "
                     f"{dev_max:.2e}): is inverse_transform the inverse of transform, and is "
                     f"the module's output its output layer?")

    def _copy_offset(self, other: "NeuralField") -> None:
        """Use ``other``'s constant offset (parametric samples sharing one module)."""
        if other._offset is not None and other.initial_kind != "constant":
            raise NotImplementedError("only a constant offset can be shared between samples")
        self._offset, self._offset_grad = other._offset, other._offset_grad
        self._offset_fn, self._offset_grad_fn = other._offset_fn, other._offset_grad_fn
        self.initial_kind = other.initial_kind
        if self._offset is not None:
            self.update()

    def _zero_output_layer(self, layer: torch.nn.Linear, bias: np.ndarray | None) -> None:
        with torch.no_grad():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.copy_(torch.from_numpy(np.zeros(layer.out_features) if bias is None
                                                  else np.asarray(bias, dtype=np.float64)))

    def _check_initial_values(self, k0: np.ndarray) -> None:
        """Finite and in the range of ``T`` on all ranks (collective)."""
        comm = self.comm
        bad = int(np.count_nonzero(~np.isfinite(k0)))
        nbad = comm.allreduce(bad)
        raise_on_any(comm, nbad > 0,
                     f"the initial guess has {nbad} NaN/Inf value(s) at the field's points")
        if self._transform_key in _POSITIVE:
            kmin = comm.allreduce(float(k0.min()) if k0.size else np.inf, op=MPI.MIN)
            raise_on_any(comm, kmin <= 0,
                         f"the initial guess must be > 0 for transform={self._transform_key!r} "
                         f"(its range); its minimum is {kmin!r}")

    def _inverse_values(self, k0: np.ndarray) -> np.ndarray:
        """``T^{-1}(k0)`` of checked values ``(n, m)`` (collective)."""
        self._check_initial_values(k0)
        with torch.no_grad():
            t = self._inverse(torch.from_numpy(np.array(k0, dtype=np.float64)))
        t = np.asarray(t.detach().numpy() if torch.is_tensor(t) else t, dtype=np.float64)
        raise_on_any(self.comm, t.shape != k0.shape or not np.all(np.isfinite(t)),
                     f"inverse_transform(initial) is not finite or of shape {k0.shape}")
        return t.reshape(k0.shape)

    def _inverse_grad(self, k0: np.ndarray, dk0: np.ndarray) -> torch.Tensor:
        """x-derivatives ``(T^{-1})'(k0) grad k0`` of the offset, shape ``(n, m, gdim)``."""
        k = torch.from_numpy(np.array(k0, dtype=np.float64)).requires_grad_(True)
        with torch.enable_grad():
            (d,) = torch.autograd.grad(self._inverse(k).sum(), k)
        return d[:, :, None] * torch.from_numpy(np.asarray(dk0, dtype=np.float64))

    def _initial_from_callable(self, initial: Callable) -> np.ndarray:
        """Offset rows from a pointwise callable; returns ``k0`` at the points (collective)."""
        m, n, gdim = self.value_size, self.n_points, self.gdim

        def call(x: np.ndarray) -> tuple[np.ndarray | None, str]:
            try:
                v = np.asarray(initial(x.copy()), dtype=np.float64)
            except Exception as err:  # noqa: BLE001 - reported on all ranks
                return None, f"initial(x) raised {type(err).__name__}: {err}"
            if v.shape in ((x.shape[0],), (x.shape[0], m)):
                return v.reshape(x.shape[0], m), ""
            want = f"({x.shape[0]},) or ({x.shape[0]}, {m})" if m > 1 else f"({x.shape[0]},)"
            return None, (f"initial(x) must return shape {want} for points x of shape "
                          f"({x.shape[0]}, {gdim}), got {v.shape}")

        k0, err = call(self._points_np) if n else (np.zeros((0, m)), "")
        raise_on_any(self.comm, bool(err), err)
        self._offset = torch.from_numpy(self._inverse_values(k0))
        inverse = self._inverse

        def offset_fn(x: np.ndarray) -> torch.Tensor:
            v, msg = call(x)
            if v is None:
                raise ValueError(msg)
            with torch.no_grad():
                return inverse(torch.from_numpy(v))

        self._offset_fn = offset_fn
        # x-derivatives: torch autograd, if the callable also takes torch tensors
        def grad_fn(x: np.ndarray) -> torch.Tensor:
            xt = torch.from_numpy(np.array(x, dtype=np.float64)).requires_grad_(True)
            with torch.enable_grad():
                o = inverse(initial(xt).reshape(x.shape[0], m))
                rows = [torch.autograd.grad(o[:, c].sum(), xt, retain_graph=c < m - 1)[0]
                        for c in range(m)]
            return torch.stack(rows, dim=1).detach()

        ok = True
        if n:
            try:
                g = grad_fn(self._points_np)
                with torch.no_grad():
                    v = inverse(initial(torch.from_numpy(self._points_np.copy())).reshape(n, m))
                ok = (g.shape == (n, m, gdim) and bool(torch.all(torch.isfinite(g)))
                      and np.allclose(v.numpy(), self._offset.numpy(), rtol=1e-12, atol=1e-14))
            except Exception:  # noqa: BLE001 - a numpy-only callable
                ok = False
        if self.comm.allreduce(int(ok), op=MPI.MIN):
            self._offset_grad = g if n else torch.zeros(0, m, gdim, dtype=torch.float64)
            self._offset_grad_fn = grad_fn
        else:
            self._offset_grad_missing = (
                "the x-derivatives of the field (quadrature H1 metrics) need the gradient of the "
                "initial guess: pass a callable that also accepts torch tensors (then autograd "
                "differentiates it), a fem.Function, or a constant")
        return k0

    def _initial_from_ufl(self, initial: fem.Function | ufl.core.expr.Expr) -> np.ndarray:
        """Offset rows from a Function/UFL expression on the mesh; returns ``k0`` at the points."""
        m, gdim = self.value_size, self.gdim
        if isinstance(initial, fem.Function):
            other = initial.function_space.mesh
            raise_on_any(self.comm, other is not self.mesh,
                         "the initial guess is a Function on another mesh than the field's; "
                         "interpolate it onto the field's mesh first "
                         "(fem.Function.interpolate_nonmatching)")
        else:
            domains = ufl.domain.extract_domains(initial)
            raise_on_any(self.comm, any(d is not self.mesh.ufl_domain() for d in domains),
                         "the initial guess is an expression on another mesh than the field's")
        shape = tuple(initial.ufl_shape)
        raise_on_any(self.comm, shape not in (((), (1,)) if m == 1 else ((m,),)),
                     f"the initial guess has value shape {shape}, the field value size is {m}")
        if self.representation == "fe":
            tmp = fem.Function(self.space)
            tmp.interpolate(fem.Expression(initial, self.space.element.interpolation_points))
            k0 = self.read(tmp).reshape(-1, m)
            self._offset = torch.from_numpy(self._inverse_values(k0))
            self._offset_grad_missing = (
                "x-derivatives of the field at the dof coordinates with an initial guess given "
                "as a Function are not available (use representation='quadrature')")
            return k0
        tdim = self.mesh.topology.dim
        cells = np.arange(self.mesh.topology.index_map(tdim).size_local, dtype=np.int32)
        X = self.quadrature_points_ref
        k0 = fem.Expression(initial, X).eval(self.mesh, cells).reshape(-1, m)
        self._offset = torch.from_numpy(self._inverse_values(k0))
        try:
            dk0 = fem.Expression(ufl.grad(initial), X).eval(self.mesh, cells)
            self._offset_grad = self._inverse_grad(k0, dk0.reshape(-1, m, gdim))
        except Exception as err:  # noqa: BLE001 - same on all ranks (same expression)
            self._offset_grad_missing = (
                f"the gradient of the initial guess cannot be evaluated at the quadrature "
                f"points ({type(err).__name__}: {err}); the x-derivatives of the field "
                f"(quadrature H1 metrics) need it")
        return k0

    # ------------------------------------------------------------ parallel
    def default_metric(self) -> H1:
        """The metric a flow uses when given none: ``H1(self)`` (alpha = beta = 1)."""
        return H1(self)

    def broadcast_parameters(self, root: int = 0, update: bool = True) -> float:
        """Copy the module's parameters and buffers from rank ``root`` to all ranks.

        Collective over :attr:`comm`. Called when the field is created; call it again
        after changing the module on each rank separately (growing it, loading it).

        Args:
            root: the rank whose values are kept.
            update: refresh the field's values afterwards.

        Returns:
            The largest absolute difference between a rank's values and ``root``'s
            before the copy (identical on all ranks; ``inf`` for non-finite ones).

        Raises:
            ValueError: (on all ranks) when the modules' parameter names or shapes
                differ between ranks, or ``root`` is not a rank.
        """
        comm = self.comm
        if not isinstance(root, int | np.integer) or not 0 <= root < comm.size:
            raise ValueError(f"root must be a rank in [0, {comm.size}), got {root!r}")
        state = self.module.state_dict(keep_vars=True)
        if comm.size > 1:
            sig = [(k, tuple(v.shape), str(v.dtype)) for k, v in state.items()]
            ref = comm.bcast(sig, root=root)
            raise_on_any(comm, ref != sig,
                         "the network's parameters differ in names or shapes between MPI "
                         "ranks; build the same module on every rank")
            arrays = comm.bcast([v.detach().cpu().numpy() for v in state.values()]
                                if comm.rank == root else None, root=root)
            diff = 0.0
            with torch.no_grad():
                for v, a in zip(state.values(), arrays, strict=True):
                    src = torch.from_numpy(a).to(v.device)
                    if v.numel() and (v.is_floating_point() or v.is_complex()):
                        d = float((v.detach() - src).abs().max())
                        diff = max(diff, d if np.isfinite(d) else np.inf)
                    elif v.numel() and not torch.equal(v.detach(), src):
                        diff = np.inf
                    v.data.copy_(src)
            diff = comm.allreduce(diff, op=MPI.MAX)
        else:
            diff = 0.0
        if update:
            self.update()
        return diff

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

    def _net(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Raw network output ``N_theta(x, mu)``, ``(n, m)``."""
        return functional_call(self.module, params, (self._inputs(x),))

    def evaluate(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``u(x)`` for given parameters; ``x`` of shape ``(n, gdim)``, result ``(n, m)``."""
        return self.post(self._net(params, x), x)

    @property
    def has_offset(self) -> bool:
        """Whether the field adds a fixed offset ``o(x)`` to the network output."""
        return self._offset is not None

    def _is_own_points(self, x: torch.Tensor) -> bool:
        if x.shape != self._points_t.shape:
            return False
        try:
            return x.data_ptr() == self._points_t.data_ptr() or torch.equal(x, self._points_t)
        except RuntimeError:  # a tensor wrapped by a torch.func transform
            return False

    def offset_at(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fixed offset ``o(x)`` added to the raw output, ``(n, m)`` (None: no offset).

        Known at the field's own points (:attr:`points`), and anywhere for a constant or
        callable initial guess.

        Raises:
            ValueError: for other points when the offset comes from a ``fem.Function``.
        """
        if self._offset is None:
            return None
        if self._offset.shape[0] == 1 and self.initial_kind == "constant":
            return self._offset
        if self._is_own_points(x):
            return self._offset
        if self._offset_fn is None:
            raise ValueError(
                "this field's initial guess (a Function) defines its offset at the field's "
                "points only; evaluate the field at field.points (or use field.ufl)")
        return self._offset_fn(x.detach().numpy())

    def _offset_rows(self, x: torch.Tensor, with_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Offset ``(n, m)`` and its x-derivatives ``(n, m, gdim)`` at ``x`` (zeros: none)."""
        n, m, gd = x.shape[0], self.value_size, self.gdim
        if self._offset is None:
            z = torch.zeros(n, m, dtype=torch.float64)
            return z, torch.zeros(n, m, gd, dtype=torch.float64)
        o = self.offset_at(x).expand(n, m)
        if not with_grad:
            return o, torch.zeros(n, m, gd, dtype=torch.float64)
        if self._offset_grad is not None and self._offset_grad.shape[0] == 1:
            return o, self._offset_grad.expand(n, m, gd)
        if self._offset_grad is not None and self._is_own_points(x):
            return o, self._offset_grad
        if self._offset_grad_fn is not None:
            return o, self._offset_grad_fn(x.detach().numpy())
        raise NotImplementedError(self._offset_grad_missing or (
            "the x-derivatives of this field's offset are known at its own points only"))

    def post(self, y: torch.Tensor, x: torch.Tensor,
             offset: torch.Tensor | None = None) -> torch.Tensor:
        """Map raw network outputs ``N(x)`` to field values ``lift + factor * T(N + o)``.

        Args:
            y: raw outputs ``(n, m)``.
            x: their points ``(n, gdim)``.
            offset: the offset ``o`` at ``x`` (rows of ``(n, m)``); None: :meth:`offset_at`.
        """
        o = self.offset_at(x) if offset is None else offset
        if o is not None:
            y = y + o
        y = self._transform(y)
        if self.factor is not None:
            f = self.factor(x)
            y = y * (f if f.ndim == 2 else f[:, None])
        if self.lift is not None:
            g = self.lift(x)
            y = y + (g if g.ndim == 2 else g[:, None])
        return y

    def _point_value(self, params: dict[str, torch.Tensor], xi: torch.Tensor, ai: torch.Tensor,
                     oi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        """``u`` at one point ``xi``, ``(m,)``, with the offset ``oi + gi (xi - ai)``.

        ``ai == xi`` in value, so this is ``u(xi)`` and its x-derivative includes ``grad o``.
        """
        xx = xi[None, :]
        return self.post(self._net(params, xx), xx, offset=(oi + gi @ (xi - ai))[None, :])[0]

    def evaluate_with_grad(
        self, params: dict[str, torch.Tensor], x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values ``(n, m)`` and x-derivatives ``(n, m, gdim)`` (torch autograd).

        Raises:
            NotImplementedError: when the offset's gradient is unknown (see the class
                docstring).
        """
        o, g = self._offset_rows(x, with_grad=True)

        def single(xi, ai, oi, gi):
            return self._point_value(params, xi, ai, oi, gi)

        vals = self.post(self._net(params, x), x, offset=o if self.has_offset else None)
        return vals, vmap(jacrev(single))(x, x, o, g)

    def network_inputs(self) -> torch.Tensor:
        """The network's input rows at the owned points, ``(n_points, gdim + n_mu)``."""
        return self._inputs(self._torch_points())

    def output_sensitivity(self) -> np.ndarray:
        """``du/dN`` at the owned points, shape ``(n_points, m)`` (chain rule of ``post``)."""
        ev = self.point_evaluator()
        if ev is not None:
            return ev.output_sensitivity(self.get_parameters())[:, None]
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
        ev = self.point_evaluator()
        if ev is not None:
            return ev.values(self.get_parameters())
        x = self._torch_points()
        with torch.no_grad():  # the module's own parameters: no functional_call needed
            return self.post(self.module(self._inputs(x)), x).reshape(-1).numpy().copy()

    def point_evaluator(self) -> MLPEvaluator | None:
        """The explicit evaluator of this field at its points (None: torch is used).

        An :class:`~nngf_fem.mlp_eval.MLPEvaluator` for the MLP networks it covers, built
        on first use and again after growth or a new offset; :meth:`values`,
        :meth:`jacobian` and :class:`Linearization` use it.
        """
        # what the evaluator was built from: the offset, factor, lift and mu (by identity)
        # and the parameter shapes (growth changes them)
        key = (self._offset, self.factor, self.lift, self._mu)
        shapes = [tuple(p.shape) for p in self.module.parameters()]
        if self._evaluator is not None:
            old_key, old_shapes, ev = self._evaluator
            if old_shapes == shapes and all(a is b for a, b in zip(old_key, key, strict=True)):
                return ev
        ev = MLPEvaluator.build(self)
        self._evaluator = (key, shapes, ev)
        return ev

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
        # column-major J (rows point-major, then component): J.T is a C-ordered
        # (P, n m) array whose rows are J's columns, so every parameter block is written
        # in place with contiguous, point-innermost loops (strided writes into a
        # Fortran-ordered view were ~10x slower), and metric products (MatMatMult) read
        # J directly
        J = np.empty((n * m, self.num_params), order="F")
        JT = J.T.reshape(self.num_params, n, m)  # a view: JT[j, p, c] = J[p m + c, j]
        outs = [seen[name][0][1] for name in used]
        hT = {name: np.ascontiguousarray(seen[name][0][0].numpy().T) for name in used}
        for c in range(m):
            grads = torch.autograd.grad(u[:, c].sum(), outs, retain_graph=c < m - 1,
                                        allow_unused=True)
            deltas = {name: None if g is None else np.ascontiguousarray(g.numpy().T)
                      for name, g in zip(used, grads, strict=True)}  # (n_out, n) each
            col = 0
            for pname, p in named:
                lname, kind = slots[pname]
                dT = deltas.get(lname)
                size = p.numel()
                block = JT[col:col + size, :, c]  # (size, n), rows contiguous when m == 1
                if dT is None:  # layer not on the path to the output
                    block[:] = 0.0
                else:
                    if kind == "bias":
                        block[:] = dT
                    else:  # d/dW[o, i] = d_o h_i, flat index o * n_in + i
                        n_out, n_in = p.shape
                        np.multiply(dT[:, None, :], hT[lname][None, :, :],
                                    out=block.reshape(n_out, n_in, n))
                col += size
        return J

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
            ev = self.point_evaluator()
            if ev is not None:
                return ev.jacobian(self.get_parameters())[1], None
            J = self._linear_layers_jacobian()
            if J is not None:
                return J, None
        params = self.param_dict()
        m, gd, P = self.value_size, self.gdim, self.num_params
        width = m * (1 + (gd if with_grad else 0))

        x = self._torch_points()
        o, g = self._offset_rows(x, with_grad)

        def one(p, xi, oi, gi):
            v = self._point_value(p, xi, xi, oi, gi)
            if not with_grad:
                return v
            dx = jacrev(lambda xx: self._point_value(p, xx, xi, oi, gi))(xi)
            return torch.cat([v, dx.reshape(-1)])

        per_point = vmap(jacrev(one), in_dims=(None, 0, 0, 0))
        chunk = max(1, int(chunk_mb * 2**20 / (8 * max(1, width * P))))
        try:
            blocks = []
            for i in range(0, max(x.shape[0], 1), chunk):
                sl = slice(i, i + chunk)
                jac = per_point(params, x[sl], o[sl], g[sl])
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
