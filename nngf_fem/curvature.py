"""Gauss-Newton natural gradient: curvature of a PDE-constrained misfit in parameter space.

For ``E(k) = D(y(k)) + R(k)`` the Gauss-Newton metric in coefficient space is
``A_GN = S'^* D_yy S' + R''`` (``S'`` the linearized control-to-state map). Pulled back
through the network it gives the Levenberg-Marquardt system (docs/method.md, section 6)

    (J^T A_GN J + lambda J^T A_H J + eps I) d = -b,        b = J^T E'(k),

where ``lambda`` (dimensionless: ``A_GN`` relative to the Hilbert metric ``A_H``) is
adapted from the ratio of actual to predicted decrease. Each product with
``J^T A_GN J`` costs one incremental forward and one incremental adjoint solve
(:meth:`~nngf_fem.pde.PDEConstrainedEnergy.gauss_newton_product`), back-substitutions
with a factorization at the current state.

:class:`GaussNewtonSubspace` runs preconditioned CG on that system (preconditioner
``(lambda G_H + eps I)^{-1}`` with ``G_H = J^T A_H J``, which costs no PDE solve) and
keeps the CG directions ``Z`` with their products. A rejected trial step then needs no
new PDE solve: the system is re-solved for a larger ``lambda`` in the span of ``Z``
(the CG solution is the Galerkin solution in that span, so for the CG's own ``lambda``
both agree).
"""

from nngf_fem.gram import GramOperator, NystromPreconditioner
from nngf_fem.mpi import allreduce_sum

import math
from typing import Any

import numpy as np

__all__ = ["GaussNewtonSubspace", "HilbertGram"]


def _finite_gram(G: np.ndarray) -> np.ndarray:
    """``G`` itself; raises FloatingPointError (on all ranks: ``G`` is allreduced) if not finite."""
    if not np.all(np.isfinite(G)):
        raise FloatingPointError("the Gram matrix J^T A_H J is not finite")
    return G


class HilbertGram:
    """``G_H = J^T A_H J`` as eigenpairs ``U diag(lam) U^T`` (dense, or a Nystrom sketch).

    Dense (exact) for up to ``dense_limit`` parameters: ``J`` is formed column by column
    from forward-mode products and ``A_H J`` costs one metric product per column (no PDE
    solve). Larger networks get a rank-``rank`` Nystrom sketch.
    """

    #: default ``dense_limit``
    DENSE_LIMIT = 400

    def __init__(self, metric, lin, dense_limit: int = DENSE_LIMIT, rank: int = 64):
        P = lin.field.num_params
        self.P = P
        self.exact = P <= dense_limit
        if self.exact:
            J = lin.J if getattr(lin, "J", None) is not None else lin.jvp_block(np.eye(P))
            G = allreduce_sum(metric.comm, metric.gram_block(J) if P else np.zeros((0, 0)))
            G = _finite_gram(0.5 * (G + G.T))
            lam, U = np.linalg.eigh(G)
            self.lam, self.U = np.maximum(lam, 0.0), U
            self.G = G
        else:
            op = GramOperator(metric, lin, 0.0)
            try:
                pre = NystromPreconditioner(op, rank)
            finally:
                op.destroy()
            self.U, self.lam, self.G = pre.U, pre.lam, None
        self.lam_max = float(self.lam.max()) if self.lam.size else 0.0
        self._metric, self._lin = metric, lin

    def apply(self, v: np.ndarray) -> np.ndarray:
        """``G_H v`` (exact: dense product; otherwise a metric product through ``J``)."""
        if self.G is not None:
            return self.G @ v
        return self._lin.vjp(self._metric.apply(self._lin.jvp(v)))

    def solve(self, v: np.ndarray, lam: float, eps: float) -> np.ndarray:
        """``(lam G_H + eps I)^{-1} v`` (exact when dense; a Nystrom approximation else)."""
        Uv = self.U.T @ v
        inner = self.U @ (Uv / (lam * self.lam + eps))
        if self.exact:
            return inner
        tail = lam * (self.lam.min() if self.lam.size else 0.0) + eps
        return inner + (v - self.U @ Uv) / tail


class _KeptKrylov:
    """Preconditioned CG on ``(A_GN + lam A_H + shift I) x = rhs`` keeping its directions.

    Subclasses give the products ``(A_GN p, A_H p)``, the preconditioner and the inner
    product. The kept directions ``Z`` with ``A_GN Z`` and ``A_H Z`` let :meth:`galerkin`
    solve for any other damping in their span without new products.
    """

    def __init__(self, rhs: np.ndarray):
        self.rhs = rhs
        self.Z, self.GZ, self.HZ = (np.zeros((rhs.size, 0)) for _ in range(3))
        self.products = 0

    def _products(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _precond(self, r: np.ndarray, lam: float, shift: float) -> np.ndarray:
        raise NotImplementedError

    def _dot(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b)

    def _reduce(self, M: np.ndarray) -> np.ndarray:
        return M

    def product(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(A_GN p, A_H p)`` (one Gauss-Newton product); ``p`` joins the kept span."""
        Gp, Hp = self._products(p)
        self.products += 1
        if not math.isfinite(self._dot(p, Gp)):
            raise FloatingPointError("non-finite Gauss-Newton product")
        self.Z = np.column_stack([self.Z, p])
        self.GZ = np.column_stack([self.GZ, Gp])
        self.HZ = np.column_stack([self.HZ, Hp])
        return Gp, Hp

    def cg(self, lam: float, shift: float, rtol: float, max_it: int) -> dict[str, Any]:
        """PCG from zero.

        Stops at ``rtol`` (preconditioned residual), ``max_it`` products or on
        non-positive curvature.
        """
        r = self.rhs.copy()
        z = self._precond(r, lam, shift)
        rz = rz0 = self._dot(r, z)
        p = z.copy()
        its, reason = 0, "max_it"
        if rz0 <= 0:
            return {"iterations": 0, "reason": "zero_rhs"}
        while its < max_it:
            Gp, Hp = self.product(p)
            its += 1
            Ap = Gp + lam * Hp + shift * p
            pAp = self._dot(p, Ap)
            if pAp <= 0:
                reason = "negative_curvature"
                break
            r = r - (rz / pAp) * Ap
            z = self._precond(r, lam, shift)
            rz_new = self._dot(r, z)
            if rz_new <= rtol**2 * rz0:
                reason = "rtol"
                break
            p = z + (rz_new / rz) * p
            rz = rz_new
        return {"iterations": its, "reason": reason}

    def galerkin(self, lam: float, shift: float) -> tuple[np.ndarray, float, float]:
        """Solution ``x`` in the kept span for damping ``lam``.

        Returns ``x``, ``rhs . x`` and ``x^T A_GN x``.
        """
        Z = self.Z
        m = Z.shape[1]
        red = self._reduce(np.column_stack([Z.T @ self.GZ, Z.T @ self.HZ, Z.T @ Z,
                                            (Z.T @ self.rhs)[:, None]]))
        G, H, ZZ, zr = red[:, :m], red[:, m : 2 * m], red[:, 2 * m : 3 * m], red[:, 3 * m]
        G, H = 0.5 * (G + G.T), 0.5 * (H + H.T)
        w, V = np.linalg.eigh(G + lam * H + shift * ZZ)
        keep = w > 1e-12 * max(w.max(initial=0.0), 1e-300)
        c = V[:, keep] @ ((V[:, keep].T @ zr) / w[keep])
        return Z @ c, float(zr @ c), float(c @ G @ c)


class GaussNewtonSubspace(_KeptKrylov):
    """Levenberg-Marquardt Gauss-Newton system in parameter space, with memory.

    ``(G_GN + lam G_H + shift I) d = -b`` with ``G_GN = J^T A_GN J``, preconditioned by
    ``(lam G_H + shift I)^{-1}`` (no PDE solve).

    Args:
        gn_apply: ``v -> J^T A_GN J v`` (replicated parameter vectors; PDE solves).
        hgram: the :class:`HilbertGram` of this point.
        b: derivative ``J^T E'`` (replicated).
    """

    def __init__(self, gn_apply, hgram: HilbertGram, b: np.ndarray):
        super().__init__(-b)
        self.gn_apply, self.hgram, self.b = gn_apply, hgram, b

    def _products(self, p):
        return self.gn_apply(p), self.hgram.apply(p)

    def _precond(self, r, lam, shift):
        return self.hgram.solve(r, lam, shift)

    def solve(self, lam: float, shift: float) -> tuple[np.ndarray, float]:
        """Galerkin solution in the kept span for damping ``lam``: ``(d, d^T G_GN d)``."""
        d, _, dGd = self.galerkin(lam, shift)
        return d, dGd


class FunctionSpaceGaussNewton(_KeptKrylov):
    """Levenberg-Marquardt Gauss-Newton step in coefficient space, kept as a subspace.

    Preconditioned CG on ``(A_GN + lambda A_H) dk = -e`` over the field's coefficient
    vector (owned rows; preconditioner: the Riesz map ``A_H^{-1}``, no PDE solve). Each
    iteration costs one Gauss-Newton product (an incremental forward/adjoint pair). The
    directions are kept, so :meth:`solve` re-solves for another ``lambda`` in their span
    without PDE solves.

    Args:
        energy: offers ``gauss_newton_product`` (dual vector on owned rows).
        metric: the Hilbert metric ``A_H`` (``apply``, ``riesz``).
        e: the derivative ``E'(k)`` (dual, owned rows).
    """

    def __init__(self, energy, metric, e: np.ndarray):
        super().__init__(-e)
        self.energy, self.metric, self.e = energy, metric, e
        self.comm = metric.comm

    def _products(self, p):
        return self.energy.gauss_newton_product(p), self.metric.apply(p)

    def _precond(self, r, lam, shift):
        return self.metric.riesz(r)

    def _dot(self, a, b):
        return self.comm.allreduce(float(a @ b))

    def _reduce(self, M):
        return allreduce_sum(self.comm, M)

    def solve(self, lam: float) -> tuple[np.ndarray, float]:
        """Galerkin solution ``dk`` in the kept span and its predicted decrease."""
        dk, rhs_dk, dGd = self.galerkin(lam, 0.0)
        return dk, rhs_dk - 0.5 * dGd  # -(e . dk + dk^T A_GN dk / 2)


def _largest_eigenvalue(G: np.ndarray, v: np.ndarray | None = None,
                        its: int = 12) -> tuple[float, np.ndarray]:
    """Power-iteration estimate of the largest eigenvalue of the SPD ``G`` (a few percent).

    Starts from ``v`` (e.g. the vector of the previous, nearby ``G``) or ``sqrt(diag G)``;
    returns the estimate and the last iterate.
    """
    if v is None or v.shape != (G.shape[0],):
        v = np.sqrt(np.maximum(np.diag(G), 0.0))
    lam = 0.0
    for _ in range(its):
        nv = np.linalg.norm(v)
        if not nv > 0:
            break
        v = v / nv
        w = G @ v
        lam = float(v @ w)
        v = w
    return lam, v


def _damped_solve(G: np.ndarray, b: np.ndarray, delta_rel: float,
                  v: np.ndarray | None = None, its: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """``-(G + delta I)^{-1} b`` with ``delta = delta_rel lambda_max(G)`` (dense, ``P x P``).

    The largest eigenvalue comes from a power iteration (from ``v``, ``its`` steps) and
    the system from an LU solve: no eigendecomposition, the fit's inner loop needs one
    solve per ``G``. Returns the solution and the power iterate (a start for the next).
    """
    lam, v = _largest_eigenvalue(_finite_gram(G), v, its)
    delta = delta_rel * max(lam, 1e-300)
    return -np.linalg.solve(G + delta * np.eye(G.shape[0]), b), v


def fit_network(field, metric, target: np.ndarray, delta_rel: float = 1e-3,
                max_it: int = 8, rtol: float = 1e-3,
                start: tuple[Any, "HilbertGram"] | None = None) -> dict[str, Any]:
    """Move the network to ``target`` (owned rows): Gauss-Newton on ``1/2 |u - t|_H^2``.

    No PDE solve: network evaluations, ``J^T A_H J`` and metric products only. Each
    iteration solves ``(J^T A_H J + delta I) d = -J^T A_H (u - t)`` (``delta`` relative
    to the largest eigenvalue) with backtracking on the fit. ``start`` may pass the
    linearization and its :class:`HilbertGram` at the current parameters (e.g. from the
    flow's direction at the same point): the first iteration then forms neither again.
    Returns the relative fit residual ``|u - t|_H / |t - u_0|_H`` and the iterations.
    """
    comm = field.comm
    ev = field.point_evaluator() if callable(getattr(field, "point_evaluator", None)) else None

    def misfit(u):  # 1/2 |u - t|_H^2 and A_H (u - t)
        Ar = metric.apply(u - target)
        return 0.5 * comm.allreduce(float((u - target) @ Ar)), Ar

    def values(th):  # the field's values at parameters th
        if ev is not None:
            return ev.values(th)
        field.set_parameters(th, update=False)
        return field.values()

    theta = field.get_parameters()
    f0, Ar = misfit(values(theta))
    f_start = max(f0, 1e-300)
    its = 0
    v_top = None
    for its in range(1, max_it + 1):  # noqa: B007
        if its == 1 and start is not None:
            lin, hg = start
            b = lin.vjp(Ar)
        elif ev is not None:
            J = ev.jacobian(theta)[1]
            G_b = allreduce_sum(comm, np.column_stack([metric.gram_block(J), J.T @ Ar]))
            hg, b = None, G_b[:, -1]
            # the top eigenvector moves little between fit iterations: a warm power
            # iteration (4 steps after the first) estimates lambda_max
            d, v_top = _damped_solve(0.5 * (G_b[:, :-1] + G_b[:, :-1].T), b, delta_rel,
                                     v_top, 12 if v_top is None else 4)
        else:
            field.set_parameters(theta, update=False)
            lin = field.linearize()
            hg = HilbertGram(metric, lin)
            b = lin.vjp(Ar)
        if hg is not None:
            d = -hg.solve(b, 1.0, delta_rel * max(hg.lam_max, 1e-300))
        tau, ok = 1.0, False
        for _ in range(12):
            with np.errstate(over="ignore", invalid="ignore"):
                f1, Ar1 = misfit(values(theta + tau * d))  # allreduced: one verdict on all ranks
            if np.isfinite(f1) and f1 <= f0 + 1e-4 * tau * float(b @ d):
                ok = True
                break
            tau *= 0.5
        if not ok:
            break
        theta = theta + tau * d
        done = f0 - f1 <= rtol * f0
        f0, Ar = f1, Ar1
        if done:
            break
    field.set_parameters(theta)
    return {"fit_residual": np.sqrt(f0 / f_start), "fit_iterations": its}
