"""Point observations when the sensors are clustered on one rank (others own no point)."""

import nngf_fem as nf

import numpy as np
import pytest
from dolfinx import fem, la, mesh
from mpi4py import MPI


def _quadratic(x):
    return 1.0 + x[0] ** 2 - 0.5 * x[0] * x[1] + 2.0 * x[1]


def _other(x):
    return x[1] ** 2 - 3.0 * x[0] + 0.25


def _sensor_points(msh, n_points: int) -> np.ndarray:
    """Midpoints of cells owned by rank 0 (one corner of the partition), same on all ranks."""
    comm = msh.comm
    pts = None
    if comm.rank == 0:
        tdim = msh.topology.dim
        x = msh.geometry.x
        dofs = msh.geometry.dofmaps[0]
        n_owned = msh.topology.index_map(tdim).size_local
        mids = x[dofs[:n_owned]].mean(axis=1)[:, :2]
        order = np.lexsort((mids[:, 1], mids[:, 0]))  # cluster: left-most cells first
        pts = mids[order[:n_points]]
    return comm.bcast(pts, root=0)


@pytest.mark.parametrize("degree", [1, 2])
def test_sensors_on_one_rank_misfit_and_adjoint_rhs(degree):
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 8, 8)
    V = fem.functionspace(msh, ("Lagrange", degree))
    pts = _sensor_points(msh, 5)
    data = np.linspace(0.3, 1.1, pts.shape[0])
    weights = np.linspace(1.0, 2.0, pts.shape[0])
    obs = nf.PointObservations(V, pts, data, weights=weights)
    n_mine = comm.allgather(len(obs._idx))
    assert sum(n_mine) == pts.shape[0]
    if comm.size > 1:
        assert n_mine[1:] == [0] * (comm.size - 1)  # the case that used to fail

    y = fem.Function(V)
    y.interpolate(_quadratic if degree == 2 else lambda x: 1.0 + 2.0 * x[0] - x[1])
    exact = (_quadratic if degree == 2 else lambda x: 1.0 + 2.0 * x[0] - x[1])(pts.T)
    np.testing.assert_allclose(obs.evaluate(y)[:, 0], exact, rtol=0, atol=1e-12)
    r = exact - data
    np.testing.assert_allclose(obs.misfit(y), 0.5 * np.sum(weights * r**2), rtol=1e-12)

    # adjoint rhs b_j = -sum_i w_i r_i phi_j(x_i): b . z = -sum_i w_i r_i z(x_i) for z in V
    b = fem.Function(V)
    obs.add_adjoint_rhs(y, b.x.array)
    b.x.scatter_reverse(la.InsertMode.add)
    z = fem.Function(V)
    z.interpolate(_other if degree == 2 else lambda x: 0.25 - 3.0 * x[0] + x[1])
    zx = (_other if degree == 2 else lambda x: 0.25 - 3.0 * x[0] + x[1])(pts.T)
    n = V.dofmap.index_map.size_local
    bz = comm.allreduce(float(b.x.array[:n] @ z.x.array[:n]))
    np.testing.assert_allclose(bz, -np.sum(weights * r * zx), rtol=1e-12)

    # the same numbers on a serial mesh (COMM_SELF) of the same problem
    msh_s = mesh.create_unit_square(MPI.COMM_SELF, 8, 8)
    Vs = fem.functionspace(msh_s, ("Lagrange", degree))
    obs_s = nf.PointObservations(Vs, pts, data, weights=weights)
    ys = fem.Function(Vs)
    ys.interpolate(_quadratic if degree == 2 else lambda x: 1.0 + 2.0 * x[0] - x[1])
    np.testing.assert_allclose(obs.misfit(y), obs_s.misfit(ys), rtol=1e-12)
    bs = fem.Function(Vs)
    obs_s.add_adjoint_rhs(ys, bs.x.array)
    # rhs entries at the dofs nearest to the sensors agree (compare by dof coordinates)
    xs = Vs.tabulate_dof_coordinates()
    xp = V.tabulate_dof_coordinates()[:n]
    nz = np.flatnonzero(bs.x.array)
    assert nz.size > 0
    mine = {tuple(np.round(c, 10)): v for c, v in zip(xp, b.x.array[:n], strict=True)}
    found = comm.allgather({k: mine[k] for k in (tuple(np.round(xs[j], 10)) for j in nz)
                            if k in mine})
    merged = {k: v for d in found for k, v in d.items()}
    assert len(merged) == nz.size
    for j in nz:
        np.testing.assert_allclose(merged[tuple(np.round(xs[j], 10))], bs.x.array[j],
                                   rtol=1e-12, atol=1e-14)


def test_pde_energy_with_clustered_sensors_runs_on_all_ranks():
    """A PDE-constrained energy with point data owned by one rank: value and gradient."""
    import torch
    import ufl

    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 6, 6)
    torch.manual_seed(0)
    k = nf.NeuralField(msh, nf.MLP(2, width=3, depth=1), transform="exp")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V), ufl.TestFunction(V)
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - 10.0 * v * ufl.dx
    msh.topology.create_connectivity(1, 2)
    bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(
        V, 1, mesh.exterior_facet_indices(msh.topology)), V)
    pts = _sensor_points(msh, 4)
    obs = nf.PointObservations(V, pts, np.full(pts.shape[0], 0.05))
    energy = nf.PDEConstrainedEnergy(F, y, [bc], control=k, observations=obs)
    E = energy.value()
    assert np.isfinite(E) and E > 0
    assert comm.allgather(E) == [E] * comm.size
    rates = nf.taylor_test(energy).rates
    assert min(rates) > 1.8
    energy.destroy()
