"""Residual-driven, function-preserving network expansion (docs/method.md, section 4).

When the tangent space ``T`` of the network cannot follow the Hilbert gradient ``g``
(alignment ``||P_T g||_H / ||g||_H`` low), neurons are added to a hidden layer with
zero outgoing weights, so the represented function is unchanged. Their tangent
directions are ``n_c(x) = s(x) sigma(w_c . h(x) + beta_c)`` (``h`` the layer's input,
``s = du/dN`` the output sensitivity). Among many random candidates ``(w_c, beta_c)``
(drawn from a seeded generator, identical on all ranks), neurons are picked greedily
by ``|<n_c, r>_H| / ||n_c||_H`` with the residual ``r = g - P_T g``, each candidate
orthogonalized (in H) against the neurons already chosen -- an orthogonal matching
pursuit that needs only the small matrices ``C = N^T A_H N`` and ``p = N^T A_H r``.
"""

from nngf_fem.flow import NaturalGradientFlow
from nngf_fem.models import expand_depth, expand_width
from nngf_fem.mpi import allreduce_sum

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

__all__ = ["ExpansionPolicy", "expand_depth", "expand_width", "residual", "run_expansive",
           "select_neurons", "width_candidates"]


def residual(flow: NaturalGradientFlow) -> dict[str, Any]:
    """Hilbert gradient ``g``, its projection and the residual ``r = g + J d`` (owned rows).

    Returns a dict with ``g``, ``r``, ``alignment`` and the direction info of the flow
    (:meth:`NaturalGradientFlow.residual`).
    """
    return flow.residual()


def _layer_input(field, layer: int) -> np.ndarray:
    with torch.no_grad():
        return field.module.features(field.network_inputs(), layer).numpy()


def width_candidates(
    field, layer: int, n_candidates: int, seed: int,
    scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0), h: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random candidate neurons ``(W (K, d_in), beta (K,))`` for hidden layer ``layer``.

    Hyperplanes ``w . h + beta = 0`` pass through random points of the bounding box of
    the layer inputs (global over ranks); ``|w|`` takes the given scales. The generator
    is seeded, so all ranks draw the same candidates. ``h``: the layer inputs at the
    owned points, if the caller has them.
    """
    h = _layer_input(field, layer) if h is None else h
    comm = field.comm
    lo = h.min(axis=0) if h.shape[0] else np.full(h.shape[1], np.inf)
    hi = h.max(axis=0) if h.shape[0] else np.full(h.shape[1], -np.inf)
    comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
    comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
    gen = np.random.default_rng(seed)
    d = h.shape[1]
    W = gen.standard_normal((n_candidates, d))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    W *= np.asarray(scales)[gen.integers(0, len(scales), n_candidates)][:, None]
    centers = lo + (hi - lo) * gen.random((n_candidates, d))
    beta = -np.einsum("kd,kd->k", W, centers)
    return W, beta


def _candidate_directions(field, layer: int, W: np.ndarray, beta: np.ndarray,
                          h: np.ndarray | None = None) -> np.ndarray:
    """Tangent directions ``n_c`` at the owned points, ``(n_local, K)``, column-major."""
    h = _layer_input(field, layer) if h is None else h
    z = torch.from_numpy(W @ h.T + beta[:, None])  # (K, n): the transpose of N, C-ordered
    act = field.module.activation(z).numpy()
    s = field.output_sensitivity()[:, 0]
    return (act * s[None, :]).T


def select_neurons(field, metric, r: np.ndarray, layer: int, k: int, n_candidates: int = 256,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Greedy H-orthogonalized selection of ``k`` neurons capturing the residual ``r``.

    Returns the chosen ``(W, beta)`` and the captured fraction ``|<q_i, r>| / ||r||`` of
    each pick (``q_i`` the orthonormalized directions).
    """
    h = _layer_input(field, layer)
    W, beta = width_candidates(field, layer, n_candidates, seed, h=h)
    N = _candidate_directions(field, layer, W, beta, h)
    AN = metric.apply_block(N)  # one sparse-times-dense product (N is column-major)
    comm = field.comm
    # diag(C) and p of C = N^T A_H N, p = N^T A_H r; the greedy steps need C only through
    # C q_i for the chosen q_i, so C itself (K x K, n K^2 products) is never formed
    red = allreduce_sum(comm, np.concatenate([np.einsum("nk,nk->k", N, AN), AN.T @ r]))
    K = N.shape[1]
    diagC, p = red[:K], red[K:]
    rnorm = np.sqrt(max(comm.allreduce(float(r @ metric.apply(r))), 1e-300))
    chosen: list[int] = []
    captured: list[float] = []
    Q = np.zeros((K, 0))  # coefficients of orthonormal q_i in the candidate basis
    CQ = np.zeros((K, 0))  # C @ Q
    for _ in range(k):
        # <n_c, q_i> for all c, projections removed
        num = p - CQ @ (Q.T @ p)
        den2 = diagC - np.einsum("ki,ki->k", CQ, CQ)
        den2[chosen] = 0.0
        score = np.where(den2 > 1e-12 * diagC.max(initial=0.0), np.abs(num) / np.sqrt(
            np.maximum(den2, 1e-300)), -1.0)
        c = int(np.argmax(score))
        if score[c] <= 0:
            break
        chosen.append(c)
        captured.append(float(score[c] / rnorm))
        q = np.zeros(K)
        q[c] = 1.0
        q -= Q @ CQ[c]  # Gram-Schmidt in coefficient space
        Cq = allreduce_sum(comm, N.T @ (AN @ q))  # C q: two products with the n x K block
        norm = np.sqrt(max(float(q @ Cq), 1e-300))
        Q = np.column_stack([Q, q / norm])
        CQ = np.column_stack([CQ, Cq / norm])
    return W[chosen], beta[chosen], captured


@dataclass
class ExpansionPolicy:
    """When and how to grow: pass it to the flow, ``NaturalGradientFlow(..., expansion=)``.

    The policy only reads the flow's history and residual; the flow performs the
    growth (:meth:`NaturalGradientFlow.grow`) and records it.

    Growth pays when the network's tangent space cannot follow the Hilbert gradient, or
    when the flow stopped making progress with the network it has. Over the last
    ``patience`` accepted steps since the last expansion, the policy fires when

    * the *mean* alignment is below ``threshold`` (a smoothed test: single steps
      oscillate), or
    * the energy decreased by less than the relative amount ``stall`` in total (the
      network has converged as far as its size allows), or
    * (``curvature="projected"`` flows) the network missed on average more than
      ``fit_threshold`` (default 30 %) of the function-space Gauss-Newton step: the mean
      relative fit residual ``|u - (k + dk)|_H / |dk|_H`` exceeds ``fit_threshold``.
      (0.3 rather than 0.5: on the Darcy families of B7, the B3 mesh study and the
      elasticity problem B8 it grows earlier, needs 20-35 % fewer PDE solves and ends
      with an equal or lower error; see BENCHMARKS.md.)

    Args:
        threshold: mean-alignment threshold.
        patience: accepted steps between expansions (and the window of both tests).
        neurons: neurons added per expansion.
        layer: hidden layer to grow (default: the last).
        max_params: never grow beyond this many parameters.
        n_candidates: random candidates per expansion.
        seed: base seed of the candidates (the expansion count is added).
        kinds: growth kinds, used in turn: ``"width"`` and/or ``"depth"``.
        stall: relative energy decrease over ``patience`` steps below which the flow
            counts as stalled (0 disables the test).
        fit_threshold: mean fit residual of projected Gauss-Newton steps above which
            the network counts as unable to follow (1 disables the test).
    """

    threshold: float = 0.6
    patience: int = 2
    neurons: int = 4
    layer: int = -1
    max_params: int = 10_000
    n_candidates: int = 256
    seed: int = 0
    kinds: tuple[str, ...] = ("width",)
    stall: float = 0.05
    fit_threshold: float = 0.3

    def __post_init__(self):
        for kind in self.kinds:
            if kind not in ("width", "depth"):
                raise ValueError(f"expansion kind {kind!r} is not known; allowed: 'width', 'depth'")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        for name in ("patience", "neurons", "max_params", "n_candidates"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("stall", "fit_threshold"):
            v = getattr(self, name)
            if not (isinstance(v, int | float | np.integer | np.floating) and 0 <= v <= 1):
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")

    def _window(self, flow: NaturalGradientFlow) -> list[dict]:
        last = flow.last_expansion
        steps = [h for h in flow.history if h.get("kind") is None and h["iteration"] >= last
                 and h.get("accepted")]
        return steps[-self.patience :]

    def should_expand(self, flow: NaturalGradientFlow) -> bool:
        """Whether growth pays now (see the class docstring); identical on all ranks."""
        if flow.field.num_params >= self.max_params:
            return False
        steps = self._window(flow)
        if len(steps) < self.patience:
            return False
        align = [h["alignment"] for h in steps if np.isfinite(h.get("alignment", np.nan))]
        low = bool(align) and float(np.mean(align)) < self.threshold
        fits = [h["fit_residual"] for h in steps if np.isfinite(h.get("fit_residual", np.nan))]
        unfit = bool(fits) and float(np.mean(fits)) > self.fit_threshold
        E0, E1 = steps[0]["energy_before"], steps[-1]["energy"]
        stalled = self.stall > 0 and (E0 - E1) <= self.stall * max(abs(E0), 1e-300)
        return low or unfit or stalled

    def propose(self, flow: NaturalGradientFlow) -> dict[str, Any]:
        """The next growth: ``kind``, ``layer``, neurons ``(W, beta)`` and diagnostics.

        Neurons are selected from seeded random candidates by how much of the residual
        ``r = g - P_T g`` they capture (:func:`select_neurons`).
        """
        field, module = flow.field, flow.field.module
        if field.value_size != 1:
            raise ValueError("expansion currently supports scalar fields (value size 1)")
        n_exp = len(flow.expansions)
        kind = self.kinds[n_exp % len(self.kinds)]
        layer = (self.layer % len(module.hidden_layers) if kind == "width"
                 else len(module.hidden_layers))
        before = flow.residual()
        W, beta, captured = select_neurons(field, flow.metric, before["r"], layer, self.neurons,
                                           self.n_candidates, self.seed + 1000 * n_exp)
        return {"kind": kind, "layer": layer, "W": W, "beta": beta, "captured": captured,
                "alignment_before": before["alignment"]}

    def expand(self, flow: NaturalGradientFlow) -> dict[str, Any]:
        """Grow the flow's network once now; returns the expansion record."""
        return flow.grow(**self.propose(flow))


def run_expansive(flow: NaturalGradientFlow, policy: ExpansionPolicy, max_iter: int = 100,
                  **run_kwargs: Any):
    """Run the flow with ``policy`` as its expansion (``flow.expansion = policy``).

    ``run_kwargs`` (a user ``callback`` included) are passed on to
    :meth:`NaturalGradientFlow.run`.
    """
    flow.expansion = policy
    return flow.run(max_iter, **run_kwargs)
