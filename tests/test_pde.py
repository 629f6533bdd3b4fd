"""PDE-constrained energies: Taylor tests, MPI agreement, user mistakes."""

import nngf_fem as nf

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI


def boundary_bc(V, value=0.0):
    msh = V.mesh
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    facets = mesh.exterior_facet_indices(msh.topology)
    dofs = fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)
    if V.dofmap.index_map_bs > 1:
        return fem.dirichletbc(np.zeros(V.dofmap.index_map_bs), dofs, V)
    return fem.dirichletbc(value, dofs, V)


def darcy(comm=MPI.COMM_WORLD, n=8, reg=None, nonlinear=False, seed=0):
    msh = mesh.create_unit_square(comm, n, n)
    torch.manual_seed(seed)
    k = nf.NeuralField(msh, nf.MLP(2, width=4, depth=1), transform="exp", name="k")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(msh)
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - 10 * v * ufl.dx
    if nonlinear:
        F += y**3 * v * ufl.dx
    y_obs = fem.Function(V, name="y_obs")
    y_obs.interpolate(lambda X: np.sin(np.pi * X[0]) * np.sin(np.pi * X[1]))
    misfit = 0.5 * (y - y_obs) ** 2 * ufl.dx + 0.1 * ufl.sin(x[0]) * y * ufl.dx
    energy = nf.PDEConstrainedEnergy(F, y, [boundary_bc(V)], control=k, misfit=misfit,
                                     regularization=reg)
    return k, energy


@pytest.mark.parametrize("reg", [None, nf.Tikhonov(0.0, "H1"), nf.Tikhonov(1e-2, "L2"),
                                 nf.Tikhonov(1e-2, "H1"),
                                 nf.Tikhonov(1e-2, "H1seminorm", reference=1.0)])
def test_taylor_linear_darcy(reg):
    k, energy = darcy(reg=reg)
    res = nf.taylor_test(energy, h0=0.1)
    assert res.min_rate >= 1.9, res
    energy.destroy()


def test_taylor_nonlinear_model():
    k, energy = darcy(nonlinear=True, reg=nf.Tikhonov(1e-3, "H1"))
    assert not energy.linear
    res = nf.taylor_test(energy, h0=0.1)
    assert res.min_rate >= 1.9, res
    assert energy.counters["newton_iterations"] > energy.counters["forward"]
    energy.destroy()


def test_taylor_vector_state_elasticity_with_neural_lame():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(1)
    mu = nf.NeuralField(msh, nf.MLP(2, width=3, depth=1), transform="softplus", name="mu")
    V = fem.functionspace(msh, ("Lagrange", 1, (2,)))
    y, v = fem.Function(V, name="u"), ufl.TestFunction(V)

    def eps(w):
        return ufl.sym(ufl.grad(w))

    sigma = 2 * mu.ufl * eps(y) + 1.0 * ufl.tr(eps(y)) * ufl.Identity(2)
    f = ufl.as_vector((0.0, -1.0))
    F = ufl.inner(sigma, eps(v)) * ufl.dx - ufl.inner(f, v) * ufl.dx
    misfit = 0.5 * ufl.inner(y, y) * ufl.dx
    energy = nf.PDEConstrainedEnergy(F, y, [boundary_bc(V)], control=mu, misfit=misfit,
                                     regularization=nf.Tikhonov(1e-3, "L2"))
    res = nf.taylor_test(energy, h0=0.1)
    assert res.min_rate >= 1.9, res
    energy.destroy()


def test_taylor_regression_and_ritz_energies():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(0)
    u = nf.NeuralField(msh, nf.MLP(2, width=4, depth=1), element=("Lagrange", 2))
    x = ufl.SpatialCoordinate(msh)
    for energy in (nf.RegressionEnergy(u, ufl.sin(x[0]) * x[1], norm="H1"),
                   nf.RitzEnergy(u, lambda a, b: ufl.inner(ufl.grad(a), ufl.grad(b)) * ufl.dx,
                                 lambda w: x[0] * w * ufl.dx)):
        assert nf.taylor_test(energy, h0=0.1).min_rate >= 1.9


def test_derivative_parallel_equals_serial():
    b = {}
    for name, comm in (("serial", MPI.COMM_SELF), ("world", MPI.COMM_WORLD)):
        k, energy = darcy(comm=comm, reg=nf.Tikhonov(1e-2, "H1"), seed=5)
        b[name] = nf.taylor.parameter_derivative(energy)
        b[name + "_E"] = energy.value()
        energy.destroy()
    np.testing.assert_allclose(b["world"], b["serial"], rtol=1e-10, atol=1e-12)
    assert b["world_E"] == pytest.approx(b["serial_E"], rel=1e-12)


def test_adjoint_reuses_forward_factorization_on_nonsymmetric_problem():
    """Advection makes dF/dy non-symmetric: the transpose solve must still be exact."""
    out = {}
    for reuse in (True, False):
        msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
        torch.manual_seed(2)
        k = nf.NeuralField(msh, nf.MLP(2, width=4, depth=1), transform="exp", name="k")
        V = fem.functionspace(msh, ("Lagrange", 1))
        y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
        x = ufl.SpatialCoordinate(msh)
        wind = ufl.as_vector((3.0 * x[1], -2.0))
        F = (ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) + ufl.dot(wind, ufl.grad(y)) * v
             - 10 * v) * ufl.dx
        energy = nf.PDEConstrainedEnergy(F, y, [boundary_bc(V)], control=k,
                                         misfit=0.5 * (y - x[0]) ** 2 * ufl.dx,
                                         reuse_factorization=reuse)
        assert energy.linear
        out[reuse] = nf.taylor.parameter_derivative(energy)
        assert energy._factorization_reusable() == reuse
        if reuse:
            res = nf.taylor_test(energy, h0=0.1)
            assert res.min_rate >= 1.9, res
        energy.destroy()
    np.testing.assert_allclose(out[True], out[False], rtol=1e-10, atol=1e-13)


def test_state_reused_when_control_unchanged():
    k, energy = darcy()
    energy.value()
    energy.value()
    energy.derivative()
    assert energy.counters["forward"] == 1 and energy.counters["adjoint"] == 1
    k.set_parameters(k.get_parameters() + 0.01)  # (the default start is k = 1: zeros)
    energy.value()
    assert energy.counters["forward"] == 2
    energy.destroy()


def test_user_mistakes_raise_before_any_solve():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    k = nf.NeuralField(msh, nf.MLP(2, width=2), transform="exp")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    y_obs = fem.Function(V, name="y_obs")
    good = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - v * ufl.dx
    misfit = 0.5 * (y - y_obs) ** 2 * ufl.dx
    with pytest.raises(ValueError, match="control .* does not appear in F"):
        nf.PDEConstrainedEnergy(ufl.inner(ufl.grad(y), ufl.grad(v)) * ufl.dx, y, control=k,
                                misfit=misfit)
    z = fem.Function(V, name="z")
    with pytest.raises(ValueError, match="state 'z' does not appear"):
        nf.PDEConstrainedEnergy(good, z, control=k, misfit=misfit)
    other = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    k2 = nf.NeuralField(other, nf.MLP(2, width=2), transform="exp")
    with pytest.raises(ValueError, match="different meshes|does not appear"):
        nf.PDEConstrainedEnergy(good, y, control=k2, misfit=misfit)
    bad = fem.Function(V, name="y_obs")
    bad.x.array[:] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nf.PDEConstrainedEnergy(good, y, control=k, misfit=0.5 * (y - bad) ** 2 * ufl.dx)
    with pytest.raises(ValueError, match="alpha"):
        nf.Tikhonov(-1.0)
    with pytest.raises(ValueError, match="metric"):
        nf.Tikhonov(1.0, "H2")


def test_noise_is_partition_independent():
    vals = {}
    for name, comm in (("serial", MPI.COMM_SELF), ("world", MPI.COMM_WORLD)):
        msh = mesh.create_unit_square(comm, 6, 6)
        V = fem.functionspace(msh, ("Lagrange", 1))
        f = fem.Function(V)
        f.interpolate(lambda X: 1 + X[0])
        g = nf.add_noise(f, 0.01, seed=3)
        vals[name] = np.sqrt(comm.allreduce(fem.assemble_scalar(fem.form((g - f) ** 2 * ufl.dx))))
    assert vals["world"] == pytest.approx(vals["serial"], rel=1e-12)
    assert 0 < vals["serial"] < 0.05
    z = nf.pde.coordinate_noise(np.random.default_rng(0).random((20000, 2)), seed=1)
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03


def _obs_problem(comm, degree=1, vector=False, seed=0):
    msh = mesh.create_unit_square(comm, 8, 8)
    torch.manual_seed(seed)
    k = nf.NeuralField(msh, nf.MLP(2, width=4, depth=1), transform="exp", name="k")
    shape = (2,) if vector else ()
    V = fem.functionspace(msh, ("Lagrange", degree, shape))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    f = ufl.as_vector((1.0, 2.0)) if vector else 10.0
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - ufl.inner(f, v) * ufl.dx
    pts = np.random.default_rng(1).random((25, 2)) * 0.9 + 0.05
    data = np.random.default_rng(2).random((25, 2) if vector else 25)
    obs = nf.PointObservations(V, pts, data)
    energy = nf.PDEConstrainedEnergy(F, y, [boundary_bc(V)], control=k, observations=obs,
                                     regularization=nf.Tikhonov(1e-3, "L2"))
    return k, y, obs, energy


@pytest.mark.parametrize("degree,vector", [(1, False), (2, False), (1, True)])
def test_point_observations_values_and_taylor(degree, vector):
    k, y, obs, energy = _obs_problem(MPI.COMM_WORLD, degree, vector)
    y.interpolate(lambda X: np.vstack([X[0] ** 2 + X[1], X[0] * X[1]]) if vector
                  else X[0] ** 2 + X[1])
    ref = np.column_stack([obs.points[:, 0] ** 2 + obs.points[:, 1],
                           obs.points[:, 0] * obs.points[:, 1]])
    vals = obs.evaluate(y)
    if degree == 2 or not vector:
        np.testing.assert_allclose(vals[:, 0], ref[:, 0],
                                   atol=1e-13 if degree == 2 else 2e-2)
    res = nf.taylor_test(energy, h0=0.1)
    assert res.min_rate >= 1.9, res
    energy.destroy()


def test_point_observation_errors():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    with pytest.raises(ValueError, match="outside the mesh"):
        nf.PointObservations(V, [[0.5, 0.5], [1.5, 0.2]], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        nf.PointObservations(V, [[0.5, 0.5]], [np.nan])
    with pytest.raises(ValueError, match="shape"):
        nf.PointObservations(V, [[0.5, 0.5, 0.1]], [1.0])


def test_point_observation_derivative_parallel_equals_serial():
    b = {}
    for name, comm in (("serial", MPI.COMM_SELF), ("world", MPI.COMM_WORLD)):
        k, y, obs, energy = _obs_problem(comm, seed=4)
        b[name] = nf.taylor.parameter_derivative(energy)
        energy.destroy()
    np.testing.assert_allclose(b["world"], b["serial"], rtol=1e-10, atol=1e-13)


def test_boundary_misfit_taylor_and_discrepancy_stop():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    torch.manual_seed(0)
    k = nf.NeuralField(msh, nf.MLP(2, width=4, depth=1), transform="exp")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(msh)
    # Robin-type problem observed on the boundary only
    F = ((ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) + y * v) * ufl.dx
         - 20 * x[0] * x[1] * v * ufl.dx)
    energy = nf.PDEConstrainedEnergy(F, y, [], control=k,
                                     misfit=0.5 * (y - x[0]) ** 2 * ufl.ds)
    assert nf.taylor_test(energy, h0=0.1).min_rate >= 1.9
    flow = nf.NaturalGradientFlow(energy, nf.H1(k), max_step=1e4)
    E0 = energy.value()
    stop = nf.discrepancy_stop(energy, noise_misfit=0.98 * E0, tau=1.0)
    res = flow.run(50, callback=stop)
    assert res.reason == "callback" and energy.misfit_value() <= 0.98 * E0
    energy.destroy()
