"""Parametric fields ``u(x; mu)``: one network, many parameter samples (model reduction).

A :class:`ParametricField` evaluates one network ``N_theta(x, mu)`` at the points of a
FE space for ``S`` parameter samples ``mu_1 .. mu_S`` at once. Each sample has its own
:class:`~nngf_fem.field.NeuralField` view (:attr:`ParametricField.samples`, sharing the
network and the space) whose ``.ufl`` Function goes into that sample's UFL forms.

The ambient Hilbert space is the product ``H^S`` with ``<u, v> = sum_i w_i <u_i, v_i>_H``
(:class:`ProductMetric`), the energy a weighted sum of per-sample energies
(:class:`ParametricEnergy`; :class:`ParametricRegressionEnergy` fits FE snapshots), and
the natural-gradient flow, its Krylov solve and the expansion run unchanged on top:
``J`` stacks the sample Jacobians, so ``G = sum_i w_i J_i^T A_H J_i``. Network
evaluations of all samples are batched into one torch call.

Row layout of a parametric linearization: the values of sample 1, ..., sample S, then
(quadrature H1 only) the x-derivatives of sample 1, ..., sample S.
"""

from nngf_fem.energies import EnergyFunctional, RegressionEnergy
from nngf_fem.field import JACOBIAN_CACHE_MB, Linearization, NeuralField, is_constant_initial
from nngf_fem.metrics import H1, Metric
from nngf_fem.mpi import raise_on_any

from collections.abc import Callable, Sequence

import numpy as np
import torch
from dolfinx import fem
from dolfinx import mesh as dmesh

__all__ = ["ParametricEnergy", "ParametricField", "ParametricRegressionEnergy", "ProductMetric"]


class ParametricField:
    """One network ``u(x; mu)`` evaluated for ``S`` parameter samples.

    Args:
        domain: mesh or Lagrange FunctionSpace (as for :class:`NeuralField`).
        module: float64 torch module mapping ``(n, gdim + n_mu)`` to ``(n, m)``.
        mus: ``(S, n_mu)`` parameter samples (identical on all ranks).
        name: base name of the sample Functions (``name_0`` ...).
        initial: initial guess, as for :class:`NeuralField` but constant only: a number
            (or one per component; every sample starts at it: zero output weights, output
            bias ``T^{-1}(k0)``), ``"module"`` or None (the default start of
            :class:`NeuralField`: ``u = 1`` for ``transform="exp"``).
        **kwargs: passed to every :class:`NeuralField` (``transform``, ``element``,
            ``representation``, ``quadrature_degree``, ``factor``, ``lift``,
            ``inverse_transform``).

    The module's parameters and buffers are copied from rank 0 when the field is created
    (:meth:`broadcast_parameters`).

    Raises:
        NotImplementedError: for a non-constant ``initial`` (a callable or a Function).
    """

    def __init__(self, domain: dmesh.Mesh | fem.FunctionSpace, module: torch.nn.Module,
                 mus: Sequence[Sequence[float]] | np.ndarray, *, name: str = "u",
                 initial: object = None, **kwargs):
        if "mu" in kwargs:
            raise TypeError("give the parameter samples as mus=(S, n_mu), not mu=")
        if not (initial is None or isinstance(initial, str) or is_constant_initial(initial)):
            raise NotImplementedError(
                "a ParametricField accepts a constant initial guess only (a number or one "
                f"per component), got {type(initial).__name__}; a non-constant start of "
                "u(x; mu) is not supported")
        mus = np.asarray(mus, dtype=np.float64)
        if mus.ndim == 1:
            mus = mus[:, None]
        if mus.ndim != 2 or mus.shape[0] == 0:
            raise ValueError(f"mus must have shape (S, n_mu) with S >= 1, got {mus.shape}")
        comm = (domain.mesh if isinstance(domain, fem.FunctionSpace) else domain).comm
        raise_on_any(comm, not np.all(np.isfinite(mus)), "mus contains NaN/Inf values")
        ref = comm.bcast(mus, root=0)
        raise_on_any(comm, ref.shape != mus.shape or not np.array_equal(ref, mus),
                     "mus differs between MPI ranks (pass the same samples on every rank)")
        first = NeuralField(domain, module, mu=mus[0], name=f"{name}_0", initial=initial,
                            **kwargs)
        space = first.space if first.representation == "fe" else first.mesh
        self.samples: list[NeuralField] = [first] + [  # share the module as first set it up
            NeuralField(space, module, mu=mu, name=f"{name}_{i}", initial="module", **kwargs)
            for i, mu in enumerate(mus[1:], start=1)]
        for s in self.samples[1:]:  # a constant offset (output layer without bias)
            s._copy_offset(first)
        self.mus = mus
        self._module = module
        self.comm = first.comm
        self.mesh, self.space, self.gdim = first.mesh, first.space, first.gdim
        self.value_size, self.representation = first.value_size, first.representation
        self.weights = None if first.weights is None else np.tile(first.weights, len(mus))
        self._mu_rows = torch.from_numpy(np.repeat(mus, first.n_points, axis=0))
        self._points = torch.from_numpy(np.tile(first.points, (len(mus), 1)))

    # ------------------------------------------------------------ properties
    @property
    def module(self) -> torch.nn.Module:
        """The shared network (assigning it, e.g. from a checkpoint, updates every sample)."""
        return self._module

    @module.setter
    def module(self, module: torch.nn.Module) -> None:
        self._module = module
        for s in self.samples:
            s.module = module

    @property
    def n_samples(self) -> int:
        """Number of parameter samples ``S``."""
        return len(self.samples)

    @property
    def functions(self) -> list[fem.Function]:
        """The sample Functions (current values of ``u(.; mu_i)``)."""
        return [s.function for s in self.samples]

    @property
    def n_points(self) -> int:
        """Owned evaluation points over all samples (``S`` times a sample's)."""
        return self._points.shape[0]

    @property
    def local_size(self) -> int:
        """Owned values over all samples on this rank."""
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
    def initial_kind(self) -> str:
        """How the field started (see :attr:`NeuralField.initial_kind`)."""
        return self.samples[0].initial_kind

    # --------------------------------------------------------- parameters
    def default_metric(self) -> "ProductMetric":
        """The metric a flow uses when given none: ``ProductMetric(self)`` (H1 per sample)."""
        return ProductMetric(self)

    def broadcast_parameters(self, root: int = 0, update: bool = True) -> float:
        """Copy the module's parameters and buffers from rank ``root`` (collective).

        See :meth:`NeuralField.broadcast_parameters`; refreshes every sample.
        """
        diff = self.samples[0].broadcast_parameters(root, update=False)
        if update:
            self.update()
        return diff

    def get_parameters(self) -> np.ndarray:
        """Flat copy of the parameters."""
        return self.samples[0].get_parameters()

    def set_parameters(self, theta: np.ndarray, update: bool = True) -> None:
        """Set the parameters and (by default) refresh every sample's values."""
        self.samples[0].set_parameters(theta, update=False)
        if update:
            self.update()

    def unflatten(self, v):
        """Split a flat parameter vector into a dict shaped like the parameters."""
        return self.samples[0].unflatten(v)

    flatten = staticmethod(NeuralField.flatten)

    def param_dict(self) -> dict[str, torch.Tensor]:
        """Detached current parameters by name."""
        return self.samples[0].param_dict()

    # --------------------------------------------------------- evaluation
    def _torch_points(self) -> torch.Tensor:
        return self._points

    def network_inputs(self) -> torch.Tensor:
        """The network's input rows ``(x, mu_i)`` of all samples (stacked), ``(S n, d)``."""
        return self._inputs(self._points)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self._mu_rows.shape[0]:
            raise ValueError("a parametric field evaluates on its own stacked points only")
        return torch.cat([x, self._mu_rows], dim=1)

    def post(self, y: torch.Tensor, x: torch.Tensor,
             offset: torch.Tensor | None = None) -> torch.Tensor:
        """Offset, output transform, factor and lift (identical for all samples)."""
        return self.samples[0].post(y, x, offset)

    def evaluate(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Values ``(S * n, m)`` at the stacked points, one batched network call."""
        return self.post(torch.func.functional_call(self.module, params, (self._inputs(x),)), x)

    def evaluate_with_grad(self, params, x):
        """Values and x-derivatives, sample by sample (quadrature H1 metrics)."""
        vals, grads = zip(*(s.evaluate_with_grad(params, s._torch_points())
                            for s in self.samples), strict=True)
        return torch.cat(vals), torch.cat(grads)

    def output_sensitivity(self) -> np.ndarray:
        """``du/dN`` at the stacked points, shape ``(S * n, m)``."""
        return np.concatenate([s.output_sensitivity() for s in self.samples])

    def values(self) -> np.ndarray:
        """Current values of all samples, flat (sample-major, then as a NeuralField)."""
        with torch.no_grad():
            return self.evaluate(self.param_dict(), self._points).reshape(-1).numpy().copy()

    def split(self, stacked: np.ndarray) -> list[np.ndarray]:
        """Split a stacked owned-values array into the ``S`` sample blocks."""
        return np.split(np.asarray(stacked), self.n_samples)

    def update(self) -> None:
        """Evaluate the network once and write every sample's Function."""
        vals = self.values()
        raise_on_any(self.comm, not np.all(np.isfinite(vals)),
                     "the network produced non-finite values (NaN/Inf) on the mesh",
                     exc=FloatingPointError)
        for s, v in zip(self.samples, self.split(vals), strict=True):
            s.write(v, s.function)

    def predict(self, mu: Sequence[float], name: str = "u_pred") -> fem.Function:
        """The network's field at a new parameter ``mu`` (a fresh Function on the space)."""
        s0 = self.samples[0]
        mu = np.asarray(mu, dtype=np.float64).reshape(-1)
        if mu.shape != (self.mus.shape[1],):
            raise ValueError(f"mu must have {self.mus.shape[1]} entries, got {mu.shape}")
        with torch.no_grad():
            x = s0._torch_points()
            inp = torch.cat([x, torch.from_numpy(mu).expand(x.shape[0], -1)], dim=1)
            vals = s0.post(self.module(inp), x).reshape(-1).numpy()
        out = fem.Function(self.space, name=name)
        s0.write(vals, out)
        return out

    def flat_evaluator(self, with_grad: bool = False) -> Callable[[dict], torch.Tensor]:
        """``params -> flat stacked values`` (x-derivative rows of all samples appended)."""
        x = self._points

        def f(p):
            if with_grad:
                v, g = self.evaluate_with_grad(p, x)
                return torch.cat([v.reshape(-1), g.reshape(-1)])
            return self.evaluate(p, x).reshape(-1)

        return f

    def linearize(self, with_grad: bool = False, cache_mb: float | None = None) -> Linearization:
        """Stacked linearization (``J v`` of all samples, ``J^T w`` summed)."""
        return Linearization(self, with_grad, JACOBIAN_CACHE_MB if cache_mb is None else cache_mb)

    def jacobian(self, with_grad: bool = False) -> np.ndarray:
        """Dense stacked Jacobian ``(rows, P)`` (value rows of all samples, then x-derivatives)."""
        parts = [s.jacobian_parts(with_grad) for s in self.samples]
        return np.concatenate([p[0] for p in parts] + ([p[1] for p in parts] if with_grad else []))


class ProductMetric:
    """``<u, v> = sum_i w_i <u_i, v_i>_H`` on the stacked values of a parametric field.

    Args:
        field: the :class:`ParametricField`.
        metric: a :class:`~nngf_fem.metrics.Metric` class (default :class:`H1`) built on
            the first sample, or an instance built on ``field.samples[0]``.
        sample_weights: ``w_i`` (default ``1/S``, matching :class:`ParametricEnergy`).
        **kwargs: passed to the metric class.
    """

    def __init__(self, field: ParametricField, metric: type | Metric = H1,
                 sample_weights: Sequence[float] | None = None, **kwargs):
        if not isinstance(field, ParametricField):
            raise TypeError(f"field must be a ParametricField, got {type(field).__name__}")
        if isinstance(metric, Metric):
            if metric.field is not field.samples[0]:
                raise ValueError("the base metric must be built on field.samples[0]")
            self.base = metric
        else:
            self.base = metric(field.samples[0], **kwargs)
        self.field, self.comm = field, field.comm
        self.sample_weights = _sample_weights(sample_weights, field.n_samples)
        self.riesz_iterations = 0
        self.name = f"{getattr(self.base, 'name', type(self.base).__name__)}^S"

    @property
    def needs_grad(self) -> bool:
        """Whether linearizations need x-derivative rows (quadrature H1)."""
        return self.base.needs_grad

    @property
    def is_fe(self) -> bool:
        """True when the base metric is a FE matrix."""
        return self.base.is_fe

    def _blocks(self, w: np.ndarray) -> list[np.ndarray]:
        S = self.field.n_samples
        if not self.needs_grad:
            return np.split(w, S)
        n = self.field.samples[0].local_size
        vals, grads = np.split(w, [S * n])
        return [np.concatenate([v, g]) for v, g in
                zip(np.split(vals, S), np.split(grads, S), strict=True)]

    def _join(self, blocks: list[np.ndarray]) -> np.ndarray:
        if not self.needs_grad:
            return np.concatenate(blocks)
        n = self.field.samples[0].local_size
        return np.concatenate([b[:n] for b in blocks] + [b[n:] for b in blocks])

    def apply(self, w: np.ndarray) -> np.ndarray:
        """``diag(w_i A_H) w`` on the stacked owned rows."""
        return self._join([c * self.base.apply(b) for c, b in
                           zip(self.sample_weights, self._blocks(np.asarray(w)), strict=True)])

    def apply_block(self, W: np.ndarray) -> np.ndarray:
        """``diag(w_i A_H) W`` for a block of stacked owned-row vectors (column-major)."""
        W = np.asarray(W, dtype=np.float64)
        if self.needs_grad or W.shape[1] == 0:
            return np.asfortranarray(np.column_stack([self.apply(W[:, j])
                                                      for j in range(W.shape[1])])
                                     if W.shape[1] else W.copy())
        rows = np.split(W, self.field.n_samples, axis=0)
        return np.asfortranarray(np.concatenate(
            [c * self.base.apply_block(b) for c, b in zip(self.sample_weights, rows,
                                                          strict=True)], axis=0))

    def gram_block(self, W: np.ndarray) -> np.ndarray:
        """This rank's part of ``W^T diag(w_i A_H) W``."""
        return np.asarray(W, dtype=np.float64).T @ self.apply_block(W)

    def inner(self, u: np.ndarray, v: np.ndarray) -> float:
        """``<u, v>`` (global, identical on all ranks)."""
        return self.comm.allreduce(float(np.dot(u, self.apply(v))))

    def norm(self, u: np.ndarray) -> float:
        """``||u||``."""
        return float(np.sqrt(max(self.inner(u, u), 0.0)))

    def riesz(self, e: np.ndarray) -> np.ndarray:
        """Riesz representer of a stacked dual vector (values rows only), sample by sample."""
        out, its = [], 0
        for c, b in zip(self.sample_weights, np.split(np.asarray(e), self.field.n_samples),
                        strict=True):
            out.append(self.base.riesz(b) / c)
            its += self.base.riesz_iterations
        self.riesz_iterations = its
        return np.concatenate(out)

    def dual_norm_squared(self, e: np.ndarray, g: np.ndarray | None = None) -> float:
        """``||e||^2`` in the dual of the product space."""
        g = self.riesz(e) if g is None else g
        return self.comm.allreduce(float(np.dot(e, g)))

    def destroy(self) -> None:
        """Destroy the base metric's PETSc objects."""
        self.base.destroy()

    def __repr__(self) -> str:
        return f"ProductMetric({self.base!r}, S={self.field.n_samples})"


def _sample_weights(weights, S: int) -> np.ndarray:
    if weights is None:
        return np.full(S, 1.0 / S)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (S,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"sample weights must be {S} positive finite numbers, got {weights!r}")
    return w


class ParametricEnergy(EnergyFunctional):
    """``E(u) = sum_i w_i E_i(u(.; mu_i))`` from one energy per sample.

    Args:
        field: the :class:`ParametricField`.
        energies: ``S`` energies, the i-th defined on ``field.samples[i]`` (any
            :class:`~nngf_fem.energies.EnergyFunctional`, PDE-constrained ones included).
        sample_weights: ``w_i`` (default ``1/S``).
    """

    def __init__(self, field: ParametricField, energies: Sequence[EnergyFunctional],
                 sample_weights: Sequence[float] | None = None):
        super().__init__(field)
        if len(energies) != field.n_samples:
            raise ValueError(f"need one energy per sample ({field.n_samples}), got {len(energies)}")
        for i, (en, s) in enumerate(zip(energies, field.samples, strict=True)):
            if en.field is not s:
                raise ValueError(f"energy {i} is not defined on field.samples[{i}]")
        self.energies = list(energies)
        self.sample_weights = _sample_weights(sample_weights, field.n_samples)

    def value(self) -> float:
        """Weighted sum of the sample energies."""
        self.counters["value"] += 1
        return float(sum(c * en.value() for c, en in
                         zip(self.sample_weights, self.energies, strict=True)))

    def sample_values(self) -> np.ndarray:
        """The unweighted sample energies ``E_i``."""
        return np.array([en.value() for en in self.energies])

    def derivative(self) -> np.ndarray:
        """Stacked weighted dual vectors ``w_i E_i'``."""
        self.counters["derivative"] += 1
        return np.concatenate([c * en.derivative() for c, en in
                               zip(self.sample_weights, self.energies, strict=True)])

    def destroy(self) -> None:
        """Destroy the sample energies."""
        for en in self.energies:
            en.destroy()


class ParametricRegressionEnergy(ParametricEnergy):
    """``E = sum_i w_i 1/2 ||u(.; mu_i) - u_h(mu_i)||_H^2``: fit FE snapshots.

    Args:
        field: the :class:`ParametricField`.
        snapshots: ``S`` targets (``fem.Function`` snapshots or UFL expressions).
        norm, alpha, beta, quadrature_degree: as :class:`~nngf_fem.energies.RegressionEnergy`.
        sample_weights: ``w_i`` (default ``1/S``).
    """

    def __init__(self, field: ParametricField, snapshots: Sequence, norm: str = "L2",
                 alpha: float = 1.0, beta: float = 1.0, quadrature_degree: int | None = None,
                 sample_weights: Sequence[float] | None = None):
        if len(snapshots) != field.n_samples:
            raise ValueError(f"need one snapshot per sample ({field.n_samples}), "
                             f"got {len(snapshots)}")
        energies = [RegressionEnergy(s, t, norm=norm, alpha=alpha, beta=beta,
                                     quadrature_degree=quadrature_degree)
                    for s, t in zip(field.samples, snapshots, strict=True)]
        super().__init__(field, energies, sample_weights)
