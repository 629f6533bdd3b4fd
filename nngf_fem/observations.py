"""Point observations ``D(y) = 1/2 sum_i w_i |y(x_i) - d_i|^2`` of a Lagrange state.

The point list is replicated on all ranks (observation sets are small). Each rank
searches its owned cells; the lowest rank that finds a point owns it, so every
observation is counted exactly once. A rank may own no point at all (sensors
clustered in one region): it contributes nothing, but takes part in the reductions.
Basis values at the points come from the pull-back to the reference cell and basix
tabulation, which gives both ``y(x_i)`` and the sparse rows ``phi_j(x_i)`` the
adjoint right-hand side needs.
"""

from nngf_fem.mpi import raise_on_any

import numpy as np
from dolfinx import fem, geometry
from mpi4py import MPI

__all__ = ["PointObservations"]


class PointObservations:
    """Observations of a state Function at given points.

    Args:
        V: the state's (scalar or blocked vector) Lagrange space.
        points: ``(N, gdim)`` coordinates, the same array on every rank.
        data: ``(N,)`` or ``(N, bs)`` observed values.
        weights: ``(N,)`` positive weights (default ``1/N``).
    """

    def __init__(self, V: fem.FunctionSpace, points, data, weights=None):
        msh = V.mesh
        comm = msh.comm
        gdim = msh.geometry.dim
        bs = V.dofmap.index_map_bs
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != gdim:
            raise ValueError(f"points must have shape (N, {gdim}), got {pts.shape}")
        n = pts.shape[0]
        d = np.asarray(data, dtype=np.float64).reshape(n, -1) if n else np.zeros((0, bs))
        if d.shape != (n, bs):
            raise ValueError(f"data must have shape ({n},) or ({n}, {bs}), got "
                             f"{np.asarray(data).shape}")
        raise_on_any(comm, not np.all(np.isfinite(d)), "observation data contain NaN/Inf values")
        w = np.full(n, 1.0 / max(n, 1)) if weights is None else np.asarray(weights, float)
        if w.shape != (n,) or np.any(w <= 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be {n} positive finite numbers")
        if not V.element.interpolation_ident or V.element.needs_dof_transformations:
            raise ValueError("point observations need a Lagrange space without dof "
                             "transformations (degree <= 2 on simplices)")
        self.V, self.comm, self.points, self.data, self.weights, self.bs = V, comm, pts, d, w, bs

        tdim = msh.topology.dim
        owned_cells = np.arange(msh.topology.index_map(tdim).size_local, dtype=np.int32)
        tree = geometry.bb_tree(msh, tdim, entities=owned_cells)
        pts3 = np.zeros((n, 3))
        pts3[:, :gdim] = pts
        cand = geometry.compute_collisions_points(tree, pts3)
        hits = geometry.compute_colliding_cells(msh, cand, pts3)
        found = np.array([len(hits.links(i)) > 0 for i in range(n)], dtype=bool)
        claim = np.where(found, comm.rank, comm.size).astype(np.int32)
        owner = np.empty_like(claim)
        comm.Allreduce(claim, owner, op=MPI.MIN)
        missing = np.flatnonzero(owner == comm.size)
        raise_on_any(comm, missing.size > 0,
                     f"{missing.size} observation point(s) lie outside the mesh, e.g. "
                     f"{pts[missing[:3]].tolist()}")
        mine = np.flatnonzero(owner == comm.rank)
        self._idx = mine
        cells = np.array([hits.links(i)[0] for i in mine], dtype=np.int32)
        cmap = msh.geometry.cmaps[0]
        gdofs = msh.geometry.dofmaps[0]
        elem = V.element.basix_element
        rows, vals = [], []
        for i, c in zip(mine, cells, strict=True):
            X = cmap.pull_back(pts[i : i + 1], msh.geometry.x[gdofs[c], :gdim])
            phi = elem.tabulate(0, X)[0, 0, :, 0]
            rows.append(V.dofmap.cell_dofs(c))
            vals.append(phi)
        ndofs = V.dofmap.dof_layout.num_dofs  # per cell (and block); also for 0 points here
        self._rows = np.array(rows, dtype=np.int64).reshape(len(mine), ndofs)
        self._phi = np.array(vals, dtype=np.float64).reshape(len(mine), ndofs)

    def evaluate(self, y: fem.Function) -> np.ndarray:
        """``y(x_i)`` for all points, shape ``(N, bs)``, identical on all ranks."""
        bs = self.bs
        local = np.zeros((self.points.shape[0], bs))
        arr = y.x.array
        for k in range(bs):
            local[self._idx, k] = np.einsum("pa,pa->p", self._phi, arr[self._rows * bs + k])
        out = np.empty_like(local)
        self.comm.Allreduce(local, out, op=MPI.SUM)
        return out

    def misfit(self, y: fem.Function) -> float:
        """``1/2 sum_i w_i |y(x_i) - d_i|^2``."""
        r = self.evaluate(y) - self.data
        return float(0.5 * np.sum(self.weights[:, None] * r**2))

    def add_adjoint_rhs(self, y: fem.Function, local_array: np.ndarray) -> None:
        """Add ``-dD/dy_j = -sum_i w_i (y(x_i) - d_i) phi_j(x_i)`` into a local (ghosted) array.

        Follow with a reverse (ADD) ghost update.
        """
        self.add_weighted_rows(self.evaluate(y) - self.data, local_array)

    def add_weighted_rows(self, values: np.ndarray, local_array: np.ndarray) -> None:
        """Add ``-sum_i w_i values_i phi_j(x_i)`` into a local (ghosted) array.

        ``values`` has shape ``(N, bs)`` (all points, identical on all ranks): with the
        residuals ``y(x_i) - d_i`` this is the adjoint right-hand side, with ``dy(x_i)``
        the action of the misfit's Hessian. Follow with a reverse (ADD) ghost update.
        """
        bs = self.bs
        r = np.asarray(values)[self._idx] * self.weights[self._idx, None]
        for k in range(bs):
            np.add.at(local_array, self._rows * bs + k, -self._phi * r[:, k : k + 1])
