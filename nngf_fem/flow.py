"""Natural neural gradient flow: ``theta <- theta + tau d``, ``(G + eps I) d = -b``.

One step (METHOD.md, section 2):

1. evaluate ``E`` and the dual derivative ``e = E'(u)``; ``b = J^T e``;
2. exact Hilbert gradient ``g = A_H^{-1} e`` (Riesz solve), ``||g||_H^2 = e . g``;
3. natural-gradient direction ``(J^T A_H J + eps I) d = -b`` (PETSc KSP, matrix-free);
4. alignment ``cos(alpha) = sqrt(-b . d) / ||g||_H`` in ``[0, 1]``;
5. Armijo backtracking on ``E`` from ``tau_0`` (no accepted step increases ``E``);
6. Levenberg-Marquardt update of ``eps`` from the ratio of actual to predicted decrease
   of the model ``m(tau d) = tau b.d + tau^2/2 d^T G d``.

The flow mimics ``torch.optim.Optimizer``: :meth:`step`, :meth:`state_dict`,
:meth:`load_state_dict`, plus :meth:`run` with stopping rules and a history.
"""

from nngf_fem.energies import EnergyFunctional
from nngf_fem.errors import FlowDivergedError, SolverError
from nngf_fem.gram import NaturalGradientSolver
from nngf_fem.metrics import H1, Metric
from nngf_fem.mpi import raise_on_any

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import numpy as np

__all__ = ["NaturalGradientFlow", "FlowResult"]


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


class NaturalGradientFlow:
    """Natural-gradient flow of an energy in a Hilbert metric.

    Args:
        energy: the energy (regression, Ritz, PDE-constrained ...).
        metric: metric ``A_H`` on the energy's field (default ``H1(field)``); this is
            both the Gram metric and the metric of the Hilbert gradient.
        method: ``"krylov"`` (matrix-free, default) or ``"dense"`` (reference).
        eps: initial damping.
        eps_min: smallest damping.
        eps_max: largest damping before the flow gives up.
        adapt_eps: adapt ``eps`` Levenberg-Marquardt style.
        max_step: largest trial step ``tau``; the first trial of each step is
            ``min(max_step, 2 tau_prev)``.
        armijo: sufficient-decrease constant ``c`` in ``E(new) <= E + c tau b.d``.
        backtrack: step reduction factor.
        max_backtracks: backtracking steps before the step is rejected and eps raised.
        alignment: compute the Hilbert gradient and the alignment every step.
        preconditioner: ``"nystrom"`` (default: randomized Nystrom, ``nystrom_rank``
            Gram products per step) or ``None`` for the natural-gradient KSP.
        nystrom_rank: sketch size of the Nystrom preconditioner.
        nystrom_refresh: solves a Nystrom sketch is reused for (see
            :class:`~nngf_fem.gram.NaturalGradientSolver`; 1 = a new sketch every step).
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
        method: str = "krylov",
        eps: float = 1e-6,
        eps_min: float = 1e-12,
        eps_max: float = 1e8,
        adapt_eps: bool = True,
        max_step: float = 1.0,
        armijo: float = 1e-4,
        backtrack: float = 0.5,
        max_backtracks: int = 20,
        alignment: bool = True,
        preconditioner: str | None = "nystrom",
        nystrom_rank: int = 32,
        nystrom_refresh: int = 1,
        petsc_options_prefix: str = "nngf_ng_",
        petsc_options: Mapping[str, Any] | None = None,
        raise_on_failure: bool = True,
    ):
        if not isinstance(energy, EnergyFunctional):
            raise TypeError(f"energy must be an EnergyFunctional, got {type(energy).__name__}")
        for name, val, lo in (("eps", eps, 0.0), ("eps_min", eps_min, 0.0),
                              ("eps_max", eps_max, 0.0), ("max_step", max_step, 0.0)):
            if not (isinstance(val, int | float) and math.isfinite(val) and val >= lo):
                raise ValueError(f"{name} must be a finite number >= {lo}, got {val!r}")
        if not 0 < backtrack < 1:
            raise ValueError(f"backtrack must be in (0, 1), got {backtrack!r}")
        if not 0 < armijo < 1:
            raise ValueError(f"armijo must be in (0, 1), got {armijo!r}")
        self.energy = energy
        self.field = energy.field
        self.comm = self.field.comm
        self._own_metric = metric is None
        if metric is None:
            from nngf_fem.parametric import ParametricField, ProductMetric

            is_param = isinstance(self.field, ParametricField)
            metric = ProductMetric(self.field) if is_param else H1(self.field)
        self.metric = metric
        if self.metric.field is not self.field:
            raise ValueError("the metric is defined on a different field than the energy")
        self.solver = NaturalGradientSolver(self.metric, method,
                                            preconditioner=preconditioner,
                                            nystrom_rank=nystrom_rank,
                                            nystrom_refresh=nystrom_refresh,
                                            petsc_options_prefix=petsc_options_prefix,
                                            petsc_options=petsc_options)
        self.eps, self.eps_min, self.eps_max = float(eps), float(eps_min), float(eps_max)
        self.adapt_eps = adapt_eps
        self.max_step, self.armijo, self.backtrack = float(max_step), armijo, backtrack
        self.max_backtracks = int(max_backtracks)
        self.compute_alignment = alignment
        self.raise_on_failure = raise_on_failure
        self.iteration = 0
        self.tau = float(max_step)
        self.history: list[dict[str, Any]] = []
        #: expansion records (see :mod:`nngf_fem.expansion`) and the last one's iteration
        self.expansions: list[dict[str, Any]] = []
        self.last_expansion = -1
        self._energy: float | None = None
        #: parameter shapes of the network the flow was created with (checkpoints compare them)
        self.initial_shapes = [tuple(p.shape) for p in getattr(self.field, "parameters", [])]
        #: extra facts stored with checkpoints and compared on load (e.g. a demo's name)
        self.checkpoint_meta: dict[str, Any] = {}

    # ------------------------------------------------------------- pieces
    def _evaluate(self, theta: np.ndarray | None = None) -> float:
        if theta is not None:
            self.field.set_parameters(theta)
        E = self.energy.value()
        return E

    def direction(self) -> dict[str, Any]:
        """Derivative, Hilbert gradient, natural-gradient direction at the current point.

        Returns a dict with ``e`` (dual), ``b = J^T e``, ``d``, ``dGd``, ``gnorm``,
        ``alignment``, KSP info and timings.
        """
        t0 = time.perf_counter()
        e = self.energy.derivative()
        t1 = time.perf_counter()
        lin = self.field.linearize(with_grad=self.metric.needs_grad)
        e_rows = e
        if self.metric.needs_grad:  # energies of quadrature fields see values only
            e_rows = np.concatenate([e, np.zeros(lin.n_rows - e.size)])
        b = lin.vjp(e_rows)
        t2 = time.perf_counter()
        gnorm = math.nan
        riesz_its = 0
        if self.compute_alignment:
            g = self.metric.riesz(e)
            riesz_its = self.metric.riesz_iterations
            gnorm = math.sqrt(max(self.metric.dual_norm_squared(e, g), 0.0))
        t3 = time.perf_counter()
        d, dGd = self.solver.solve(lin, b, self.eps)
        t4 = time.perf_counter()
        bd = float(b @ d)
        align = math.nan
        if self.compute_alignment:
            align = 1.0 if gnorm == 0.0 else min(math.sqrt(max(-bd, 0.0)) / gnorm, 1.0)
        return {"e": e, "b": b, "d": d, "bd": bd, "dGd": dGd, "gnorm": gnorm,
                "alignment": align, "ksp_its": self.solver.iterations,
                "ksp_reason": self.solver.reason, "riesz_its": riesz_its,
                "sketch_products": getattr(self.solver, "sketch_products", 0),
                "t_sketch": getattr(self.solver, "t_sketch", 0.0),
                "t_pde": t1 - t0, "t_network": t2 - t1, "t_riesz": t3 - t2, "t_ng": t4 - t3}

    # --------------------------------------------------------------- step
    def step(self) -> dict[str, Any]:
        """One natural-gradient step; returns (and appends to the history) its record.

        Raises:
            FlowDivergedError: non-finite energy at the current parameters.
        """
        tstart = time.perf_counter()
        theta0 = self.field.get_parameters()
        t0 = time.perf_counter()
        E0 = self._energy if self._energy is not None else self._evaluate()
        t_pde = time.perf_counter() - t0
        raise_on_any(self.comm, not math.isfinite(E0), f"energy is not finite ({E0})",
                     FlowDivergedError)
        info = self.direction()
        d, bd, dGd = info["d"], info["bd"], info["dGd"]
        tau = min(self.max_step, 2.0 * self.tau) if self.history else self.max_step
        accepted, E1, n_bt = False, E0, 0
        t0 = time.perf_counter()
        if bd < 0 and np.all(np.isfinite(d)):
            for n_bt in range(self.max_backtracks + 1):  # noqa: B007
                try:  # a trial that overflows the network or breaks the PDE solve is rejected
                    E1 = self._evaluate(theta0 + tau * d)
                except (FloatingPointError, SolverError):  # raised on all ranks together
                    E1 = math.inf
                if math.isfinite(E1) and E1 <= E0 + self.armijo * tau * bd:
                    accepted = True
                    break
                tau *= self.backtrack
        t_ls = time.perf_counter() - t0
        eps_used = self.eps
        if accepted:
            pred = -(tau * bd + 0.5 * tau**2 * dGd)
            rho = (E0 - E1) / pred if pred > 0 else 0.0
            self.tau = tau
            self._energy = E1
            if self.adapt_eps:
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
            rho = math.nan
            self.field.set_parameters(theta0)
            self._energy = E0
            E1 = E0
            self.eps = min(max(self.eps, 1e-12) * 10.0, self.eps_max)
            self.tau = self.max_step
        rec = {
            "iteration": self.iteration, "energy": E1, "energy_before": E0,
            "gnorm": info["gnorm"], "alignment": info["alignment"],
            "step": tau if accepted else 0.0,
            "eps": eps_used, "rho": rho, "accepted": accepted, "backtracks": n_bt,
            "ksp_its": info["ksp_its"], "ksp_reason": info["ksp_reason"],
            "sketch_products": info["sketch_products"], "t_sketch": info["t_sketch"],
            "riesz_its": info["riesz_its"], "n_params": self.field.num_params,
            "bd": bd, "t_pde": t_pde + info["t_pde"] + t_ls, "t_riesz": info["t_riesz"],
            "t_ng": info["t_ng"], "t_network": info["t_network"],
            "t_total": time.perf_counter() - tstart,
        }
        self.history.append(rec)
        self.iteration += 1
        rec["stalled"] = not accepted and eps_used >= self.eps_max
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
        ``target_energy``, or ``callback(flow, record)`` returns True. With
        ``checkpoint`` a file is written atomically every ``checkpoint_every``
        iterations and at the end (see :mod:`nngf_fem.checkpoint`).
        """
        from nngf_fem.checkpoint import save_checkpoint

        if not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
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
                if callback is not None and callback(self, rec):
                    reason, converged = "callback", True
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
                "parameters": self.field.get_parameters(), "solver": self.solver.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same network architecture)."""
        self.field.set_parameters(np.asarray(state["parameters"]))
        self.iteration = int(state["iteration"])
        self.eps, self.tau = float(state["eps"]), float(state["tau"])
        self._energy = state["energy"]
        self.history = [dict(h) for h in state["history"]]
        if "solver" in state:
            self.solver.load_state_dict(state["solver"])

    def reset_cache(self) -> None:
        """Forget the cached energy (after the parameters were changed from outside)."""
        self._energy = None

    def destroy(self) -> None:
        """Destroy PETSc objects owned by the flow (a default metric)."""
        if self._own_metric:
            self.metric.destroy()
