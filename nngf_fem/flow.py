"""Natural neural gradient flow: ``theta <- theta + d``, curvature and expansion included.

One step (docs/method.md, sections 2, 4 and 6):

1. evaluate ``E`` and the dual derivative ``e = E'(u)``; ``b = J^T e``;
2. exact Hilbert gradient ``g = A_H^{-1} e`` (Riesz solve), ``||g||_H^2 = e . g``, the
   natural-gradient direction ``(J^T A_H J + eps I) d_H = -b`` and the alignment
   ``cos(alpha) = sqrt(-b . d_H) / ||g||_H`` in ``[0, 1]``;
3. the step, by the flow's ``curvature``:

   * ``"gauss-newton"`` (default for PDE-constrained energies): Levenberg-Marquardt on
     ``(J^T A_GN J + lambda J^T A_H J + eps I) d = -b`` (see :mod:`nngf_fem.curvature`);
     the first trial is the model's own step, ``lambda`` adapts to the ratio of actual to
     predicted decrease, and a rejected trial is re-solved for a larger ``lambda``
     without new PDE solves;
   * ``"none"``: the paper's first-order flow along ``d_H``. Its step length comes from
     a model of ``E`` along ``d_H`` (the Gram model ``tau = 1`` for energies whose metric
     is their Hessian model, e.g. regression and Ritz energies; for PDE-constrained
     energies the Gauss-Newton curvature along ``d_H`` at the first step and the
     parabola through the last accepted step afterwards), with Armijo backtracking by
     quadratic interpolation. No step grows by a doubling schedule.

4. expansion is a step of the flow: when ``flow.expansion`` (an
   :class:`~nngf_fem.expansion.ExpansionPolicy`) says growth pays, the flow grows the
   network by the neurons the policy selects (:meth:`NaturalGradientFlow.grow`) before
   its next step, and records it.

No accepted step increases ``E``. Every stop decision is taken collectively. The flow
mimics ``torch.optim.Optimizer``: :meth:`step`, :meth:`state_dict`,
:meth:`load_state_dict`, plus :meth:`run` with stopping rules and a history.
"""

from nngf_fem.checkpoint import save_checkpoint
from nngf_fem.control import NetworkControl, require
from nngf_fem.curvature import (
    FunctionSpaceGaussNewton,
    GaussNewtonSubspace,
    HilbertGram,
    fit_network,
)
from nngf_fem.energies import EnergyFunctional
from nngf_fem.errors import FlowDivergedError, SolverError
from nngf_fem.gram import NaturalGradientSolver
from nngf_fem.metrics import Metric
from nngf_fem.models import expand_depth, expand_width
from nngf_fem.mpi import raise_on_any

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import numpy as np
from mpi4py import MPI

__all__ = ["NaturalGradientFlow", "FlowResult", "CURVATURES"]

#: step methods of :class:`NaturalGradientFlow`
CURVATURES = ("auto", "gauss-newton", "projected", "lbfgs", "none")

#: largest Levenberg-Marquardt parameter (relative to the Hilbert metric): a flow that
#: cannot decrease the energy even there is at a stationary point of its network
LAMBDA_MAX = 1e12

#: failures of a trial evaluation or of a direction that reject a step (raised on all ranks)
_TRIAL_ERRORS = (FloatingPointError, SolverError, np.linalg.LinAlgError)


@dataclass
class FlowResult:
    """Outcome of :meth:`NaturalGradientFlow.run`."""

    converged: bool
    reason: str
    iterations: int
    energy: float
    history: list[dict[str, Any]] = dc_field(default_factory=list)

    def column(self, key: str) -> np.ndarray:
        """One history column as an array (e.g. ``"energy"``)."""
        return np.array([h.get(key, np.nan) for h in self.history], dtype=float)


def _number(name: str, val: Any, lo: float, *, strict: bool = False) -> float:
    ok = isinstance(val, int | float | np.integer | np.floating) and not isinstance(val, bool)
    if ok:
        val = float(val)
        ok = math.isfinite(val) and (val > lo if strict else val >= lo)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {lo}, "
                         f"got {val!r}")
    return val


class NaturalGradientFlow:
    """Natural-gradient flow of an energy in a Hilbert metric (see the module docstring).

    Args:
        energy: the energy (regression, Ritz, PDE-constrained ...).
        metric: metric ``A_H`` on the energy's field (default
            ``field.default_metric()``: ``H1(field)`` for a
            :class:`~nngf_fem.field.NeuralField`, the product ``H1`` metric for a
            :class:`~nngf_fem.parametric.ParametricField`); this is both the Gram metric
            and the metric of the Hilbert gradient.
        curvature: ``"auto"`` (default: for energies with a ``gauss_newton_product``,
            i.e. PDE-constrained energies, ``"projected"`` with a FE-representation
            metric and ``"gauss-newton"`` otherwise; ``"none"`` for other energies),
            ``"projected"`` (Gauss-Newton in coefficient space, the network fitted onto
            the step), ``"gauss-newton"`` (Gauss-Newton in the network's tangent space),
            ``"lbfgs"`` or ``"none"`` (the paper's first-order flow).
        expansion: an :class:`~nngf_fem.expansion.ExpansionPolicy` (or None): grow the
            network when it says so, as a step of the flow.
        method: ``"krylov"`` (matrix-free, default) or ``"dense"`` (reference) for the
            natural-gradient solve.
        eps: initial damping of the Gram system (first-order flow); the Gauss-Newton
            flow uses ``eps`` relative to the largest eigenvalue of ``J^T A_H J``.
        eps_min: smallest damping.
        eps_max: largest damping before the flow gives up (``reason="stalled"``).
        adapt_eps: adapt ``eps`` Levenberg-Marquardt style (first-order flow).
        max_step: a safeguard on the step length ``tau`` of the first-order flow, not a
            tuning knob. Default: 1 (the Gram model's step) for energies whose metric is
            their own Hessian model (regression, Ritz), unbounded for PDE-constrained
            energies, whose steps come from the Gauss-Newton model.
        armijo: sufficient-decrease constant ``c`` (``E(new) <= E + c * predicted``).
        backtrack: largest step reduction factor of a backtracking step.
        max_backtracks: rejected trials before the damping is raised for the next step.
        alignment: compute the Hilbert gradient and the alignment every step.
        preconditioner: ``"nystrom"`` (default: randomized Nystrom, ``nystrom_rank``
            Gram products per step) or ``None`` for the natural-gradient KSP.
        nystrom_rank: sketch size of the Nystrom preconditioner.
        nystrom_refresh: solves a Nystrom sketch is reused for (see
            :class:`~nngf_fem.gram.NaturalGradientSolver`; 1 = a new sketch every step).
        max_cg: largest number of Gauss-Newton products (incremental PDE solve pairs)
            of one Gauss-Newton step (default ``min(P, 30)``).
        cg_forcing: largest relative CG tolerance of a Gauss-Newton step; the tolerance
            is ``min(cg_forcing, sqrt(|b| / |b_0|))`` (Eisenstat-Walker).
        fit_iterations: Gauss-Newton iterations of the network fit of a ``"projected"``
            step (network evaluations only, no PDE solve).
        parameter_damping: ``delta`` of the Gauss-Newton damping
            ``lambda (J^T A_H J + delta I)``, relative to the largest eigenvalue of
            ``J^T A_H J``: the Euclidean part bounds the parameter step where the
            network's linearization stops holding.
        petsc_options_prefix: prefix of the natural-gradient KSP.
        petsc_options: options of the natural-gradient KSP (CG, rtol 1e-10 default).
        raise_on_failure: raise :class:`FlowDivergedError` when the energy becomes
            non-finite. A flow that cannot decrease the energy even at ``eps_max``
            (a stationary point) stops with ``reason="stalled"``.
    """

    def __init__(
        self,
        energy: EnergyFunctional,
        metric: Metric | None = None,
        *,
        curvature: str = "auto",
        expansion: Any = None,
        method: str = "krylov",
        eps: float = 1e-6,
        eps_min: float = 1e-12,
        eps_max: float = 1e8,
        adapt_eps: bool = True,
        max_step: float | None = None,
        armijo: float = 1e-4,
        backtrack: float = 0.5,
        max_backtracks: int = 20,
        alignment: bool = True,
        preconditioner: str | None = "nystrom",
        nystrom_rank: int = 32,
        nystrom_refresh: int = 1,
        max_cg: int | None = None,
        cg_forcing: float = 0.5,
        parameter_damping: float = 1e-3,
        fit_iterations: int = 20,
        petsc_options_prefix: str = "nngf_ng_",
        petsc_options: Mapping[str, Any] | None = None,
        raise_on_failure: bool = True,
    ):
        if not isinstance(energy, EnergyFunctional):
            raise TypeError(f"energy must be an EnergyFunctional, got {type(energy).__name__}")
        eps_min = _number("eps_min", eps_min, 0.0)
        eps_max = _number("eps_max", eps_max, 0.0, strict=True)
        eps = _number("eps", eps, 0.0)
        if eps > eps_max:
            raise ValueError(f"eps must be <= eps_max ({eps_max:g}), got {eps!r}")
        if max_step is not None:
            max_step = _number("max_step", max_step, 0.0, strict=True)
        if not 0 < backtrack < 1:
            raise ValueError(f"backtrack must be in (0, 1), got {backtrack!r}")
        if not 0 < armijo < 1:
            raise ValueError(f"armijo must be in (0, 1), got {armijo!r}")
        if not isinstance(max_backtracks, int | np.integer) or max_backtracks < 0:
            raise ValueError(f"max_backtracks must be an integer >= 0, got {max_backtracks!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature={curvature!r} is not known; allowed: {CURVATURES}")
        has_gn = callable(getattr(energy, "gauss_newton_product", None))
        if curvature == "auto":
            fe_metric = (getattr(energy.field, "representation", "fe") == "fe" if metric is None
                         else not getattr(metric, "needs_grad", False))
            curvature = ("projected" if fe_metric else "gauss-newton") if has_gn else "none"
        if curvature in ("gauss-newton", "projected", "lbfgs") and not has_gn:
            raise ValueError(f"curvature='gauss-newton' needs an energy with a Gauss-Newton "
                             f"product (e.g. PDEConstrainedEnergy); {type(energy).__name__} "
                             "has none")
        if max_cg is not None and (not isinstance(max_cg, int | np.integer) or max_cg < 1):
            raise ValueError(f"max_cg must be a positive integer, got {max_cg!r}")
        if not 0 < cg_forcing < 1:
            raise ValueError(f"cg_forcing must be in (0, 1), got {cg_forcing!r}")
        if expansion is not None and not (callable(getattr(expansion, "should_expand", None))
                                          and callable(getattr(expansion, "propose", None))):
            raise TypeError("expansion must be an ExpansionPolicy (should_expand/propose), "
                            f"got {type(expansion).__name__}")
        require(energy.field, NetworkControl, "NaturalGradientFlow")
        self.energy = energy
        self.field = energy.field
        self.comm = self.field.comm
        self._own_metric = metric is None
        if metric is None:
            metric = self.field.default_metric()
        self.metric = metric
        if self.metric.field is not self.field:
            raise ValueError("the metric is defined on a different field than the energy")
        self.solver = NaturalGradientSolver(self.metric, method,
                                            preconditioner=preconditioner,
                                            nystrom_rank=nystrom_rank,
                                            nystrom_refresh=nystrom_refresh,
                                            petsc_options_prefix=petsc_options_prefix,
                                            petsc_options=petsc_options)
        self.curvature = curvature
        self.expansion = expansion
        self._gn_energy = has_gn
        self.eps, self.eps_min, self.eps_max = eps, eps_min, eps_max
        self.adapt_eps = adapt_eps
        if max_step is None:
            max_step = math.inf if has_gn else 1.0
        self.max_step, self.armijo, self.backtrack = float(max_step), armijo, backtrack
        self.max_backtracks = int(max_backtracks)
        self.max_cg, self.cg_forcing = max_cg, float(cg_forcing)
        self.parameter_damping = _number("parameter_damping", parameter_damping, 0.0)
        if not isinstance(fit_iterations, int | np.integer) or fit_iterations < 1:
            raise ValueError(f"fit_iterations must be a positive integer, got {fit_iterations!r}")
        self.fit_iterations = int(fit_iterations)
        self.compute_alignment = alignment
        self.raise_on_failure = raise_on_failure
        self.iteration = 0
        self.tau = min(1.0, self.max_step)
        self.lam: float | None = None  # Levenberg-Marquardt parameter (Gauss-Newton)
        self._b0norm: float | None = None
        self._tau_next: float | None = None  # first trial of the next first-order step
        self._lbfgs: dict[str, Any] = {"theta": None, "b": None, "pairs": []}
        self.lbfgs_memory = 10
        self.history: list[dict[str, Any]] = []
        #: expansion records (see :mod:`nngf_fem.expansion`) and the last one's iteration
        self.expansions: list[dict[str, Any]] = []
        self.last_expansion = -1
        self._energy: float | None = None
        #: (parameters, direction info) computed by :meth:`grow`, used by the next step
        self._direction_cache: tuple[np.ndarray, dict[str, Any]] | None = None
        #: parameter shapes of the network the flow was created with (checkpoints compare them)
        self.initial_shapes = [tuple(p.shape) for p in getattr(self.field, "parameters", [])]
        #: extra facts stored with checkpoints and compared on load (e.g. a demo's name)
        self.checkpoint_meta: dict[str, Any] = {}

    # ------------------------------------------------------------- pieces
    def _evaluate(self, theta: np.ndarray | None = None) -> float:
        if theta is not None:
            self.field.set_parameters(theta)
        return self.energy.value()

    def _trial(self, theta: np.ndarray) -> float:
        """``E(theta)``, or inf when the network overflows or the PDE solve fails."""
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                E = self._evaluate(theta)
        except _TRIAL_ERRORS:  # raised on all ranks together
            return math.inf
        return E if math.isfinite(E) else math.inf

    def _nonfinite(self, E: float) -> None:
        """Raise :class:`FlowDivergedError` (all ranks) for a non-finite energy here."""
        if math.isfinite(E):
            return
        describe = getattr(self.energy, "describe_value", None)
        what = f": {describe()}" if callable(describe) else ""
        theta = self.field.get_parameters()
        raise FlowDivergedError(
            f"the energy is not finite ({E}) at the accepted parameters (iteration "
            f"{self.iteration}, |theta|_max {np.max(np.abs(theta), initial=0.0):.3e}){what}")

    def direction(self) -> dict[str, Any]:
        """Derivative, Hilbert gradient, natural-gradient direction at the current point.

        Returns a dict with ``e`` (dual), ``b = J^T e``, ``d`` (the natural-gradient
        direction ``d_H``), ``dGd``, ``gnorm``, ``alignment``, the linearization ``lin``,
        KSP info and timings.
        """
        t0 = time.perf_counter()
        e = self.energy.derivative()
        t1 = time.perf_counter()
        lin = self.field.linearize(with_grad=self.metric.needs_grad)
        e_rows = e
        if self.metric.needs_grad:  # energies of quadrature fields see values only
            e_rows = np.concatenate([e, np.zeros(lin.n_rows - e.size)])
        b = lin.vjp(e_rows)
        raise_on_any(self.comm, not np.all(np.isfinite(b)),
                     "the parameter derivative J^T E' is not finite", FloatingPointError)
        t2 = time.perf_counter()
        gnorm = math.nan
        riesz_its = 0
        g = None
        if self.compute_alignment:
            g = self.metric.riesz(e)
            riesz_its = self.metric.riesz_iterations
            gnorm = math.sqrt(max(self.metric.dual_norm_squared(e, g), 0.0))
        t3 = time.perf_counter()
        hgram = None
        if self._dense_gram(lin):
            # the curvature steps form the exact J^T A_H J at this point anyway: the
            # direction d_H (needed for the alignment) comes from it, no Krylov solve
            hgram = HilbertGram(self.metric, lin)
            d = -hgram.solve(b, 1.0, self.eps)
            dGd = float(d @ hgram.apply(d))
            ksp_its, ksp_reason, sketch, t_sketch = 0, 1, 0, 0.0
        else:
            d, dGd = self.solver.solve(lin, b, self.eps)
            ksp_its, ksp_reason = self.solver.iterations, self.solver.reason
            sketch = getattr(self.solver, "sketch_products", 0)
            t_sketch = getattr(self.solver, "t_sketch", 0.0)
        t4 = time.perf_counter()
        bd = float(b @ d)
        if not (np.all(np.isfinite(d)) and math.isfinite(dGd)):
            raise FloatingPointError("the natural-gradient direction is not finite")
        align = math.nan
        if self.compute_alignment:
            align = 1.0 if gnorm == 0.0 else min(math.sqrt(max(-bd, 0.0)) / gnorm, 1.0)
        return {"e": e, "b": b, "d": d, "bd": bd, "dGd": dGd, "gnorm": gnorm, "lin": lin,
                "g": g, "hgram": hgram,
                "alignment": align, "ksp_its": ksp_its,
                "ksp_reason": ksp_reason, "riesz_its": riesz_its,
                "sketch_products": sketch, "t_sketch": t_sketch,
                "t_pde": t1 - t0, "t_network": t2 - t1, "t_riesz": t3 - t2, "t_ng": t4 - t3}

    def _dense_gram(self, lin) -> bool:
        """Whether this step forms ``J^T A_H J`` exactly (curvature flows, small ``P``)."""
        return (self.curvature != "none" and self.solver.method != "dense"
                and getattr(lin, "J", None) is not None
                and self.field.num_params <= HilbertGram.DENSE_LIMIT)

    def residual(self) -> dict[str, Any]:
        """Hilbert gradient ``g``, the residual ``r = g - P_T g = g + J d_H`` (owned rows).

        Returns a dict with ``g``, ``r``, ``alignment`` and the direction info.
        """
        if self.metric.needs_grad:
            raise ValueError("expansion needs a FE-representation metric (representation='fe')")
        info = self.direction()
        g = self.metric.riesz(info["e"])
        Jd = info["lin"].jvp(info["d"])
        return {"g": g, "r": g + Jd, "alignment": info["alignment"], "info": info}

    def _gn_apply(self, lin) -> Callable[[np.ndarray], np.ndarray]:
        """``v -> J^T A_GN J v`` (one incremental forward + adjoint solve pair)."""
        n_val = self.field.local_size

        def apply(v: np.ndarray) -> np.ndarray:
            Jv = lin.jvp(v)
            dual = self.energy.gauss_newton_product(Jv[:n_val])
            if lin.n_rows > n_val:
                dual = np.concatenate([dual, np.zeros(lin.n_rows - n_val)])
            return lin.vjp(dual)

        return apply

    # --------------------------------------------------------------- step
    def step(self) -> dict[str, Any]:
        """One step (an expansion first, when the policy says so); returns its record.

        The record is appended to :attr:`history`; an expansion adds its own record
        (``kind`` set) before it.

        Raises:
            FlowDivergedError: non-finite energy at the current (accepted) parameters.
        """
        if self.expansion is not None and self.expansion.should_expand(self):
            self.grow(**self.expansion.propose(self))
        tstart = time.perf_counter()
        theta0 = self.field.get_parameters()
        t0 = time.perf_counter()
        E0 = self._energy if self._energy is not None else self._evaluate()
        t_pde = time.perf_counter() - t0
        self._nonfinite(E0)
        try:
            cached, self._direction_cache = self._direction_cache, None
            if cached is not None and cached[0].shape == theta0.shape \
                    and np.array_equal(cached[0], theta0):
                info = cached[1]  # computed by grow() at these parameters
            else:
                info = self.direction()
            failure = ""
        except _TRIAL_ERRORS as err:  # non-finite Gram products etc.: reject, damp
            info, failure = None, str(err)
        rec: dict[str, Any] = {"iteration": self.iteration}
        if info is None:
            rec.update(self._rejected(theta0, E0, failure))
        elif self.curvature == "gauss-newton":
            rec.update(self._gauss_newton_step(theta0, E0, info))
        elif self.curvature == "lbfgs":
            rec.update(self._lbfgs_step(theta0, E0, info))
        elif self.curvature == "projected":
            rec.update(self._projected_step(theta0, E0, info))
        else:
            rec.update(self._first_order_step(theta0, E0, info))
        if info is not None:
            rec.update({"gnorm": info["gnorm"], "alignment": info["alignment"],
                        "ksp_its": info["ksp_its"], "ksp_reason": info["ksp_reason"],
                        "sketch_products": info["sketch_products"],
                        "t_sketch": info["t_sketch"], "riesz_its": info["riesz_its"],
                        "t_riesz": info["t_riesz"], "t_ng": info["t_ng"],
                        "t_network": info["t_network"]})
            rec["t_pde"] = rec.get("t_pde", 0.0) + info["t_pde"]
        rec.update({"energy_before": E0, "n_params": self.field.num_params,
                    "curvature": self.curvature})
        rec["t_pde"] = rec.get("t_pde", 0.0) + t_pde
        rec["t_total"] = time.perf_counter() - tstart
        if hasattr(self.energy, "pde_solves"):
            rec["pde_solves"] = self.energy.pde_solves
        self.history.append(rec)
        self.iteration += 1
        rec["stalled"] = not rec["accepted"] and (
            rec["eps"] >= self.eps_max or rec.get("lambda", 0.0) >= LAMBDA_MAX)
        return rec

    def _restore(self, theta0: np.ndarray, E0: float) -> None:
        """Back to the accepted parameters; the energy's state follows (a cache hit)."""
        self.field.set_parameters(theta0)
        self._evaluate()  # the state and misfit of the accepted point, not of a trial
        self._energy = E0

    def _reject(self, theta0: np.ndarray, E0: float) -> None:
        """A step found no acceptable trial: back to ``theta0``, damp the next one more."""
        self._restore(theta0, E0)
        self.eps = min(max(self.eps, 1e-12) * 10.0, self.eps_max)

    def _rejected(self, theta0: np.ndarray, E0: float, why: str) -> dict[str, Any]:
        eps_used = self.eps
        self._reject(theta0, E0)
        if self.lam is not None:
            self.lam *= 10.0
        self._tau_next = None
        return {"energy": E0, "step": 0.0, "eps": eps_used, "rho": math.nan,
                "accepted": False, "backtracks": 0, "bd": math.nan, "failure": why,
                "gnorm": math.nan, "alignment": math.nan, "ksp_its": 0, "ksp_reason": 0}

    def _armijo(self, theta0, E0, d, bd, tau, shrink) -> tuple[bool, float, int, float]:
        """Backtracking from ``tau`` along ``d`` until Armijo's condition holds.

        A finite trial above the tangent line is followed by the minimizer of the
        interpolating parabola (within ``[0.1 tau, backtrack tau]``); otherwise ``tau``
        shrinks by ``shrink`` (by at least 10x after a non-finite trial). Returns
        ``(accepted, E at the last trial, backtracks, tau)``.
        """
        accepted, E1, n_bt = False, E0, 0
        for n_bt in range(self.max_backtracks + 1):  # noqa: B007
            E1 = self._trial(theta0 + tau * d)
            if math.isfinite(E1) and E1 <= E0 + self.armijo * tau * bd and E1 < E0:
                accepted = True
                break
            if math.isfinite(E1) and E1 > E0 + bd * tau:  # quadratic interpolation
                tq = -bd * tau**2 / (2.0 * (E1 - E0 - bd * tau))
                tau = min(max(tq, 0.1 * tau), self.backtrack * tau)
            else:
                tau *= shrink if math.isfinite(E1) else min(shrink, 0.1)
        return accepted, E1, n_bt, tau

    def _accept(self, E1: float, E0: float, pred: float) -> bool:
        """Sufficient decrease against the predicted decrease (``pred > 0``)."""
        return math.isfinite(E1) and E1 < E0 and E0 - E1 >= self.armijo * pred

    def _first_order_step(self, theta0, E0, info) -> dict[str, Any]:
        d, bd, dGd = info["d"], info["bd"], info["dGd"]
        t0 = time.perf_counter()
        model_curv = dGd  # curvature of the Gram model along d (regression/Ritz: exact)
        if self._gn_energy:
            if self._tau_next is None:  # one Gauss-Newton product: the model along d
                curv = float(d @ self._gn_apply(info["lin"])(d))
                self.energy.counters["curvature_probes"] = \
                    self.energy.counters.get("curvature_probes", 0) + 1
                tau = -bd / curv if curv > 0 else 1.0
                model_curv = curv
            else:
                tau = self._tau_next
                model_curv = -bd / tau
        else:
            tau = min(self.max_step, 2.0 * self.tau) if self.history else self.max_step
        tau = min(tau, self.max_step)
        accepted, E1, n_bt = False, E0, 0
        if bd < 0:
            accepted, E1, n_bt, tau = self._armijo(theta0, E0, d, bd, tau, self.backtrack)
        t_ls = time.perf_counter() - t0
        eps_used = self.eps
        rho = math.nan
        if accepted:
            pred = -(tau * bd + 0.5 * tau**2 * model_curv)
            rho = (E0 - E1) / pred if pred > 0 else 0.0
            self.tau = tau
            self._energy = E1
            if self._gn_energy:  # next first trial: minimizer of the parabola along d
                c = 2.0 * (E1 - E0 - bd * tau) / tau**2
                t_star = -bd / c if c > 0 else 4.0 * tau
                self._tau_next = min(max(t_star, 0.25 * tau), 4.0 * tau)
            elif self.adapt_eps:
                unit = min(1.0, self.max_step)
                if n_bt > 0 and tau < unit:
                    # shorter than the unit (Gauss-Newton) step: damp the next direction
                    # instead, and try the unit step again
                    self.eps = min(max(self.eps, self.eps_min) * unit / tau, self.eps_max)
                    self.tau = 0.5 * unit
                elif n_bt == 0 and (rho > 0.75 or tau > unit):
                    self.eps = max(self.eps / 3.0, self.eps_min)
                elif rho < 0.25 and tau <= unit:
                    self.eps = min(max(self.eps, self.eps_min) * 2.0, self.eps_max)
        else:
            self._reject(theta0, E0)
            E1 = E0
            self.tau = self.max_step if not self._gn_energy else 1.0
            self._tau_next = None
        return {"energy": E1, "step": tau if accepted else 0.0, "eps": eps_used, "rho": rho,
                "accepted": accepted, "backtracks": n_bt, "bd": bd, "t_pde": t_ls}

    def _lbfgs_step(self, theta0, E0, info) -> dict[str, Any]:
        """L-BFGS in parameter space with the natural gradient as initial inverse Hessian.

        ``H_0 = gamma (J^T A_H J + delta I)^{-1}`` (the network analogue of function-space
        L-BFGS with the Riesz map as initial Hessian); the memory is kept across steps
        and cleared at an expansion.
        """
        b, lin = info["b"], info["lin"]
        t0 = time.perf_counter()
        hg = info.get("hgram") or HilbertGram(self.metric, lin)
        delta = self.parameter_damping * max(hg.lam_max, 1e-300)
        mem = self._lbfgs
        if mem["theta"] is not None and mem["theta"].shape == theta0.shape:
            s_k, y_k = theta0 - mem["theta"], b - mem["b"]
            if float(s_k @ y_k) > 1e-12 * float(np.linalg.norm(s_k) * np.linalg.norm(y_k)):
                mem["pairs"] = [*mem["pairs"][-(self.lbfgs_memory - 1):], (s_k, y_k)]
        mem["theta"], mem["b"] = theta0.copy(), b.copy()
        q = b.copy()
        alphas = []
        for s_k, y_k in reversed(mem["pairs"]):
            a_k = float(s_k @ q) / float(y_k @ s_k)
            alphas.append(a_k)
            q -= a_k * y_k
        if mem["pairs"]:
            s_k, y_k = mem["pairs"][-1]
            h0y = hg.solve(y_k, 1.0, delta)
            gamma = float(s_k @ y_k) / max(float(y_k @ h0y), 1e-300)
        else:
            gamma = None
        r = hg.solve(q, 1.0, delta) * (1.0 if gamma is None else gamma)
        for (s_k, y_k), a_k in zip(mem["pairs"], reversed(alphas), strict=True):
            beta_k = float(y_k @ r) / float(y_k @ s_k)
            r += (a_k - beta_k) * s_k
        d = -r
        bd = float(b @ d)
        if not (bd < 0 and np.all(np.isfinite(d))):  # not a descent direction: restart
            mem["pairs"] = []
            d = -hg.solve(b, 1.0, delta)
            bd, gamma = float(b @ d), None
        if gamma is None:  # no curvature pair yet: Gauss-Newton curvature along d
            curv = float(d @ self._gn_apply(lin)(d))
            tau = -bd / curv if curv > 0 else 1.0
        else:
            tau = 1.0
        accepted, E1, n_bt, tau = self._armijo(theta0, E0, d, bd, tau, 0.1)
        t_ls = time.perf_counter() - t0
        if accepted:
            self._energy = E1
        else:
            self._reject(theta0, E0)
            E1 = E0
            mem["pairs"] = []
        return {"energy": E1, "step": tau if accepted else 0.0, "eps": self.eps,
                "rho": math.nan, "accepted": accepted, "backtracks": n_bt, "bd": bd,
                "lbfgs_pairs": len(mem["pairs"]), "t_pde": t_ls}

    def _levenberg_marquardt(self, theta0, E0, propose) -> tuple:
        """Levenberg-Marquardt trials until one is accepted.

        ``propose(lambda) -> (theta or None, predicted decrease)``. After each rejection
        ``lambda`` grows by Nielsen's rule (``lambda *= nu, nu *= 2``); on acceptance
        ``lambda *= max(1/3, 1 - (2 rho - 1)^3)``. A rejected step restores ``theta0`` and
        raises ``eps``. Returns ``(accepted, E1, backtracks, lambda used, rho)``.
        """
        accepted, E1, n_bt, lam_used, rho = False, E0, 0, self.lam, math.nan
        nu = 2.0
        for n_bt in range(self.max_backtracks + 1):  # noqa: B007
            lam_used = self.lam
            try:
                theta, pred = propose(self.lam)
            except _TRIAL_ERRORS:
                theta, pred = None, math.nan
            if theta is not None and pred > 0:
                E1 = self._trial(theta)
                rho = (E0 - E1) / pred if math.isfinite(E1) else -math.inf
                if self._accept(E1, E0, pred):
                    accepted = True
                    break
            self.lam = min(self.lam * nu, LAMBDA_MAX)
            nu *= 2.0
            if lam_used >= LAMBDA_MAX:
                break
        if accepted:
            self._energy = E1
            self.lam = min(max(self.lam * max(1.0 / 3.0, 1.0 - (2.0 * min(rho, 1.0) - 1.0) ** 3),
                               1e-12), LAMBDA_MAX)
        else:
            self._reject(theta0, E0)
            E1 = E0
        return accepted, E1, n_bt, lam_used, rho

    def _projected_step(self, theta0, E0, info) -> dict[str, Any]:
        """Gauss-Newton step in coefficient space, then the network moved onto it.

        The Levenberg-Marquardt step ``dk`` of ``(A_GN + lambda A_H) dk = -e`` (CG with
        the Riesz map as preconditioner) gives the target ``k + dk`` (``k exp(dk / k)``
        for positive transforms); the network is fitted to it in the H metric without
        PDE solves (:func:`~nngf_fem.curvature.fit_network`), and the energy decides.
        """
        if self.metric.needs_grad:
            raise ValueError("curvature='projected' needs a FE-representation metric")
        e = info["e"]
        t0 = time.perf_counter()
        counters = self.energy.counters
        inc0 = counters.get("incremental", 0)
        fs = FunctionSpaceGaussNewton(self.energy, self.metric, e)
        g = info["g"] if info.get("g") is not None else self.metric.riesz(e)
        enorm = math.sqrt(max(self.comm.allreduce(float(e @ g)), 0.0))
        if self._b0norm is None or self._b0norm == 0.0:
            self._b0norm = enorm
        if self.lam is None:  # scale-free start: A_GN against A_H along the gradient
            Gg, Hg = fs.product(g)
            self.lam = max(self.comm.allreduce(float(g @ Gg))
                           / max(self.comm.allreduce(float(g @ Hg)), 1e-300), 1e-12)
        rtol = min(self.cg_forcing, math.sqrt(enorm / max(self._b0norm, 1e-300)))
        cg = fs.cg(self.lam, 0.0, rtol, self.max_cg or 30)
        k0 = self.field.values()
        positive = getattr(self.field, "transform_name", "") in ("exp", "softplus")
        fit: dict[str, Any] = {}

        def propose(lam: float):
            dk, pred = fs.solve(lam)
            if not pred > 0:
                return None, pred
            with np.errstate(over="ignore"):
                target = k0 * np.exp(np.clip(dk / np.where(k0 != 0, k0, 1.0), -50, 50)) \
                    if positive else k0 + dk
            self.field.set_parameters(theta0)
            start = (info["lin"], info["hgram"]) if info.get("hgram") is not None else None
            fit.update(fit_network(self.field, self.metric, target, 1e-6,
                                   max_it=self.fit_iterations, rtol=1e-4, start=start))
            return self.field.get_parameters(), pred

        accepted, E1, n_bt, lam_used, rho = self._levenberg_marquardt(theta0, E0, propose)
        t_ls = time.perf_counter() - t0
        return {"energy": E1, "step": 1.0 if accepted else 0.0, "eps": self.eps, "rho": rho,
                "accepted": accepted, "backtracks": n_bt, "bd": math.nan, "lambda": lam_used,
                "cg_its": cg["iterations"], "cg_reason": cg["reason"], "cg_rtol": rtol,
                "gn_products": counters.get("incremental", 0) - inc0,
                "fit_residual": fit.get("fit_residual", math.nan),
                "fit_iterations": fit.get("fit_iterations", 0), "t_pde": t_ls}

    def _gauss_newton_step(self, theta0, E0, info) -> dict[str, Any]:
        b, lin = info["b"], info["lin"]
        t0 = time.perf_counter()
        counters = self.energy.counters
        inc0 = counters.get("incremental", 0)
        hg = info.get("hgram") or HilbertGram(self.metric, lin)
        scale = max(hg.lam_max, 1e-300)
        # damping lambda (J^T A_H J + delta I): the Euclidean part keeps the step inside
        # the region where the network's linearization holds
        delta = self.parameter_damping * scale
        eps = max(self.eps, self.eps_min) * scale
        sub = GaussNewtonSubspace(self._gn_apply(lin), hg, b)
        bnorm = math.sqrt(max(float(b @ hg.solve(b, 1.0, delta)), 0.0))
        if self._b0norm is None or self._b0norm == 0.0:
            self._b0norm = bnorm
        if self.lam is None:  # scale-free start: GN curvature relative to the damping
            v = -hg.solve(b, 1.0, delta)
            Gv, Hv = sub.product(v)
            self.lam = max(float(v @ Gv) / max(float(v @ Hv) + delta * float(v @ v), 1e-300),
                           1e-12)
        rtol = min(self.cg_forcing, math.sqrt(bnorm / max(self._b0norm, 1e-300)))
        max_cg = self.max_cg or min(self.field.num_params, 30)
        cg = sub.cg(self.lam, self.lam * delta + eps, rtol, max_cg)
        last: dict[str, Any] = {"d": None}

        def propose(lam: float):
            d, dGd = sub.solve(lam, lam * delta + eps)
            last["d"] = d
            pred = -(float(b @ d) + 0.5 * dGd)
            return (theta0 + d if np.all(np.isfinite(d)) else None), pred

        accepted, E1, n_bt, lam_used, rho = self._levenberg_marquardt(theta0, E0, propose)
        t_ls = time.perf_counter() - t0
        d, tau = last["d"], 1.0 if accepted else 0.0
        return {"energy": E1, "step": tau, "eps": eps, "rho": rho, "accepted": accepted,
                "backtracks": n_bt, "bd": float(b @ d) if d is not None else math.nan,
                "lambda": lam_used, "cg_its": cg["iterations"], "cg_reason": cg["reason"],
                "cg_rtol": rtol, "gn_products": counters.get("incremental", 0) - inc0,
                "t_pde": t_ls}

    # ---------------------------------------------------------- expansion
    def grow(self, kind: str, layer: int, W: np.ndarray, beta: np.ndarray,
             **info: Any) -> dict[str, Any]:
        """Grow the network by the neurons ``(W, beta)``, function-preservingly; record it.

        Args:
            kind: ``"width"`` (neurons added to hidden layer ``layer``, zero outgoing
                weights) or ``"depth"`` (an identity-initialized residual block).
            layer: hidden layer (width growth).
            W: ``(k, d_in)`` input weights of the new neurons.
            beta: ``(k,)`` their biases.
            **info: extra entries of the record (e.g. the policy's ``captured`` fractions
                and ``alignment_before``).

        The represented function is unchanged; caches that depend on the parameter
        space (energy, Nystrom sketch, Gauss-Newton damping scale) are reset.
        """
        field, module = self.field, self.field.module
        p0 = field.num_params
        vals0 = field.values()
        if kind == "width":
            expand_width(module, layer, W, beta)
        elif kind == "depth":
            expand_depth(module, W, beta)
        else:
            raise ValueError(f"kind={kind!r} is not known; allowed: 'width', 'depth'")
        sync = getattr(field, "broadcast_parameters", None)
        if callable(sync):  # identical parameters on all ranks by construction
            sync(update=False)
        field.update()
        change = float(np.max(np.abs(field.values() - vals0), initial=0.0))
        change = self.comm.allreduce(change, op=MPI.MAX)
        self._energy = None
        self._tau_next = None
        self._lbfgs = {"theta": None, "b": None, "pairs": []}
        self.eps = max(self.eps, self.eps_min)
        if self.lam is not None and self.lam >= LAMBDA_MAX:  # grown after a stall: start afresh
            self.lam = None
        E = self.energy.value()
        rec = {"iteration": self.iteration, "kind": kind, "layer": layer,
               "params_before": p0, "params_after": field.num_params, "energy": E,
               "max_value_change": change, **info}
        if self.compute_alignment and not self.metric.needs_grad:
            info = self.direction()  # also the next step's direction (same parameters)
            rec["alignment_after"] = info["alignment"]
            self._direction_cache = (field.get_parameters(), info)
        self._energy = E
        self.expansions.append(rec)
        self.last_expansion = self.iteration
        self.history.append(dict(rec))
        return rec

    # ---------------------------------------------------------------- run
    def run(
        self,
        max_iter: int = 100,
        *,
        gtol: float = 0.0,
        rtol: float = 0.0,
        etol: float = 0.0,
        target_energy: float | None = None,
        callback: Callable[["NaturalGradientFlow", dict], bool | None] | None = None,
        progress: bool = False,
        checkpoint: str | None = None,
        checkpoint_every: int = 10,
    ) -> FlowResult:
        """Run until ``max_iter`` iterations in total (a resumed flow continues its count).

        Stops when ``||g||_H <= gtol``, ``||g||_H <= rtol ||g_0||_H``, the relative
        energy decrease of an accepted step is below ``etol``, the energy reaches
        ``target_energy``, or ``callback(flow, record)`` returns True (on any rank:
        the stop is collective). The callback sees every step record, the last one
        included, before the other stopping rules (it may add entries to the record,
        e.g. an error against a known truth). A stalled flow with an expansion policy
        grows instead of stopping. With ``checkpoint`` a file is written atomically
        every ``checkpoint_every`` iterations and at the end (see
        :mod:`nngf_fem.checkpoint`).
        """
        if not isinstance(max_iter, int | np.integer) or isinstance(max_iter, bool) \
                or max_iter < 0:
            raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
        if not isinstance(checkpoint_every, int | np.integer) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got "
                             f"{checkpoint_every!r}")
        max_iter = int(max_iter)
        bar = None
        if progress and self.comm.rank == 0:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=max_iter, initial=self.iteration, desc="nngf", leave=False)
            except ImportError:  # pragma: no cover
                bar = None
        g0 = self.history[0]["gnorm"] if self.history else None
        reason, converged = "max_iter", False
        try:
            while self.iteration < max_iter:
                rec = self.step()
                g0 = rec["gnorm"] if g0 is None else g0
                if bar is not None:
                    bar.set_postfix(E=f"{rec['energy']:.3e}", align=f"{rec['alignment']:.2f}",
                                    P=rec["n_params"])
                    bar.update(1)
                # every record goes to the callback (the user may annotate it); a callback
                # may decide on one rank only: the stop is decided together
                stop = bool(callback(self, rec)) if callback is not None else False
                if self.comm.allreduce(stop, op=MPI.LOR):
                    reason, converged = "callback", True
                    break
                if rec["stalled"] and self.expansion is not None \
                        and self.field.num_params < self.expansion.max_params:
                    # stationary for this network: growth is the way on
                    self.grow(**self.expansion.propose(self))
                    continue
                if rec["stalled"]:  # no decrease even at maximal damping: stationary
                    reason = "stalled"
                    if self.raise_on_failure and not math.isfinite(rec["energy"]):
                        raise FlowDivergedError(f"energy is not finite ({rec['energy']})")
                    break
                if rec["gnorm"] <= gtol or (rtol > 0 and rec["gnorm"] <= rtol * g0):
                    reason, converged = "gtol", True
                    break
                if target_energy is not None and rec["energy"] <= target_energy:
                    reason, converged = "target_energy", True
                    break
                if (etol > 0 and rec["accepted"]
                        and rec["energy_before"] - rec["energy"]
                        <= etol * max(abs(rec["energy_before"]), 1e-300)):
                    reason, converged = "etol", True
                    break
                if checkpoint and self.iteration % checkpoint_every == 0:
                    save_checkpoint(checkpoint, self)
            if checkpoint:
                save_checkpoint(checkpoint, self)
        finally:
            if bar is not None:
                bar.close()
        E = self._energy if self._energy is not None else self._evaluate()
        return FlowResult(converged, reason, self.iteration, E, self.history)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Flow state (parameters included) for checkpoints."""
        return {"iteration": self.iteration, "eps": self.eps, "tau": self.tau,
                "energy": self._energy, "history": [dict(h) for h in self.history],
                "parameters": self.field.get_parameters(), "solver": self.solver.state_dict(),
                "curvature": self.curvature, "lambda": self.lam, "b0norm": self._b0norm,
                "tau_next": self._tau_next}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same network architecture)."""
        self.field.set_parameters(np.asarray(state["parameters"]))
        self._direction_cache = None
        self.iteration = int(state["iteration"])
        self.eps, self.tau = float(state["eps"]), float(state["tau"])
        self._energy = state["energy"]
        self.history = [dict(h) for h in state["history"]]
        if "solver" in state:
            self.solver.load_state_dict(state["solver"])
        if state.get("curvature", self.curvature) != self.curvature:
            raise ValueError(f"the state was saved by a flow with curvature="
                             f"{state['curvature']!r}, this flow has {self.curvature!r}")
        self.lam, self._b0norm = state.get("lambda"), state.get("b0norm")
        self._tau_next = state.get("tau_next")

    def reset_cache(self) -> None:
        """Forget the cached energy (after the parameters were changed from outside)."""
        self._energy = None
        self._tau_next = None
        self._direction_cache = None

    def destroy(self) -> None:
        """Destroy PETSc objects owned by the flow (a default metric)."""
        if self._own_metric:
            self.metric.destroy()
