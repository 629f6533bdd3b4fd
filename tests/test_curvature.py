"""Gauss-Newton natural gradient, state cache and restore, expansion as a flow step."""

import nngf_fem as nf

import math

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI


def _bc(V):
    msh = V.mesh
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    dofs = fem.locate_dofs_topological(V, msh.topology.dim - 1,
                                       mesh.exterior_facet_indices(msh.topology))
    return fem.dirichletbc(0.0, dofs, V)


def darcy(comm=MPI.COMM_WORLD, n=8, width=4, nonlinear=False, seed=0, data=None, points=False):
    """A small Darcy inversion; ``data="exact"`` makes the data the state of the start."""
    msh = mesh.create_unit_square(comm, n, n)
    torch.manual_seed(seed)
    k = nf.NeuralField(msh, nf.MLP(2, width=width, depth=1), transform="exp", name="k")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - 10 * v * ufl.dx
    if nonlinear:
        F += y**3 * v * ufl.dx
    y_obs = fem.Function(V, name="y_obs")
    x = ufl.SpatialCoordinate(msh)
    if data == "exact":
        pre = nf.PDEConstrainedEnergy(F, y, [_bc(V)], control=k, misfit=0.5 * y**2 * ufl.dx)
        pre.solve_forward()
        y_obs.x.array[:] = y.x.array
        pre.destroy()
    else:
        y_obs.interpolate(lambda X: 0.3 * np.sin(np.pi * X[0]) * np.sin(np.pi * X[1]))
    obs = None
    if points:
        pts = np.array([[0.3, 0.4], [0.7, 0.2], [0.5, 0.5]])
        obs = nf.PointObservations(V, pts, [0.1, 0.2, 0.3])
    energy = nf.PDEConstrainedEnergy(F, y, [_bc(V)], control=k,
                                     misfit=0.5 * (y - y_obs) ** 2 * ufl.dx
                                     + fem.Constant(msh, 0.0 if data == "exact" else 0.01)
                                     * ufl.sin(x[0]) * y * ufl.dx,
                                     observations=obs,
                                     regularization=nf.Tikhonov(1e-3, "H1", reference=1.0))
    return k, energy


def _perturbed_derivative(energy, k, dk, h):
    n = dk.size
    base = k.function.x.array.copy()
    out = []
    for s in (h, -h):
        k.function.x.array[:n] = base[:n] + s * dk
        k.function.x.scatter_forward()
        energy.value()
        out.append(energy.derivative())
    k.function.x.array[:] = base
    return (out[0] - out[1]) / (2 * h)


@pytest.mark.parametrize("nonlinear", [False, True])
@pytest.mark.parametrize("points", [False, True])
def test_gauss_newton_product_is_the_hessian_at_zero_residual(nonlinear, points):
    k, energy = darcy(data="exact", nonlinear=nonlinear)
    if points:  # data equal to the state at the start: zero residual again
        energy.value()
        y_pts = nf.PointObservations(energy.y.function_space, [[0.3, 0.4], [0.6, 0.7]],
                                     [0.0, 0.0]).evaluate(energy.y)
        energy.observations = nf.PointObservations(energy.y.function_space,
                                                   [[0.3, 0.4], [0.6, 0.7]], y_pts)
        energy._solved_for = None
    energy.regularization  # noqa: B018 - the Tikhonov term's Hessian is part of both
    rng = np.random.default_rng(MPI.COMM_WORLD.rank)
    dk = rng.standard_normal(k.local_size)
    energy.value()
    energy.derivative()
    H = energy.gauss_newton_product(dk)
    fd = _perturbed_derivative(energy, k, dk, 1e-6)
    num = math.sqrt(MPI.COMM_WORLD.allreduce(float(np.sum((H - fd) ** 2))))
    den = math.sqrt(MPI.COMM_WORLD.allreduce(float(np.sum(fd**2))))
    assert num <= 1e-5 * den
    assert energy.counters["incremental"] == 1
    energy.destroy()


def test_gauss_newton_product_is_symmetric_positive():
    k, energy = darcy(nonlinear=True, points=True)
    energy.value()
    energy.derivative()
    rng = np.random.default_rng(7 + MPI.COMM_WORLD.rank)
    a, b = rng.standard_normal((2, k.local_size))
    comm = MPI.COMM_WORLD
    aHb = comm.allreduce(float(a @ energy.gauss_newton_product(b)))
    bHa = comm.allreduce(float(b @ energy.gauss_newton_product(a)))
    aHa = comm.allreduce(float(a @ energy.gauss_newton_product(a)))
    assert abs(aHb - bHa) <= 1e-10 * max(abs(aHb), 1e-300)
    assert aHa > 0
    energy.destroy()


def test_changed_constant_is_not_served_from_the_cache():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    k = nf.NeuralField(msh, nf.MLP(2, width=3), transform="exp", name="k")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    f = fem.Constant(msh, 1.0)
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - f * v * ufl.dx
    energy = nf.PDEConstrainedEnergy(F, y, [_bc(V)], control=k, misfit=0.5 * y**2 * ufl.dx)
    E1 = energy.value()
    f.value = 2.0
    E2 = energy.value()
    assert E2 == pytest.approx(4 * E1, rel=1e-10)  # y is linear in f
    f.value = 1.0
    assert energy.value() == pytest.approx(E1, rel=1e-12)
    energy.destroy()


def test_singular_forward_problem_raises_a_clear_error():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    k = nf.NeuralField(msh, nf.MLP(2, width=3), transform="exp", name="k")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(msh)
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - x[0] * v * ufl.dx  # pure Neumann
    energy = nf.PDEConstrainedEnergy(F, y, [], control=k, misfit=0.5 * y**2 * ufl.dx)
    with pytest.raises(nf.SolverError, match="singular"):
        energy.value()
    energy.destroy()


def test_misfit_without_the_state_is_refused():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    k = nf.NeuralField(msh, nf.MLP(2, width=3), transform="exp", name="k")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V), ufl.TestFunction(V)  # default DOLFINx name "f"
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - v * ufl.dx
    with pytest.raises(ValueError, match="misfit does not contain the state"):
        nf.PDEConstrainedEnergy(F, y, [_bc(V)], control=k, misfit=0.5 * k.ufl**2 * ufl.dx)
    with pytest.raises(ValueError, match=r"state \(the Function Function\)|the state"):
        other = fem.Function(V)
        nf.PDEConstrainedEnergy(F, other, [_bc(V)], control=k, misfit=0.5 * other**2 * ufl.dx)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_rejected_overflowing_trial_leaves_later_evaluations_finite(nonlinear):
    k, energy = darcy(nonlinear=nonlinear)
    theta = k.get_parameters()
    E0 = energy.value()
    bad = theta.copy()
    bad[-1] -= 600.0  # output bias: k ~ exp(-600), the state overflows
    try:
        with np.errstate(all="ignore"):
            E_bad = energy.value() if k.set_parameters(bad) is None else None
    except (nf.SolverError, FloatingPointError):
        E_bad = math.inf
    assert E_bad != pytest.approx(E0)
    k.set_parameters(theta)
    assert energy.value() == pytest.approx(E0, rel=1e-12)
    theta2 = theta + 1e-3  # a new control: Newton starts from the last good state
    k.set_parameters(theta2)
    assert math.isfinite(energy.value())
    energy.destroy()


@pytest.mark.parametrize("curvature", ["projected", "gauss-newton", "lbfgs", "none"])
def test_curvature_flows_decrease_the_energy_monotonically(curvature):
    k, energy = darcy(width=6)
    flow = nf.NaturalGradientFlow(energy, nf.H1(k, alpha=1.0, beta=0.01), curvature=curvature)
    E0 = energy.value()
    res = flow.run(8)
    E = res.column("energy")
    assert np.all(np.diff(E) <= 0) and E[-1] < (0.5 if curvature != "none" else 0.9) * E0
    assert res.history[-1]["pde_solves"] == energy.pde_solves
    flow.destroy()
    energy.destroy()


def test_gauss_newton_beats_the_first_order_flow_in_pde_solves():
    out = {}
    for curvature in ("projected", "gauss-newton", "none"):
        k, energy = darcy(width=6)
        flow = nf.NaturalGradientFlow(energy, nf.H1(k, alpha=1.0, beta=0.01),
                                      curvature=curvature)
        res = flow.run(60, target_energy=0.06 * energy.value())  # the minimum is ~0.057
        out[curvature] = (res.reason, energy.pde_solves)
        flow.destroy()
        energy.destroy()
    for method in ("projected", "gauss-newton"):
        assert out[method][0] == "target_energy", out
        assert out["none"][0] != "target_energy" or out[method][1] < out["none"][1], out


def test_stalled_network_grows_instead_of_stopping():
    k, energy = darcy(width=2)
    policy = nf.ExpansionPolicy(threshold=0.0, stall=0.0, fit_threshold=1.0, max_params=30)
    flow = nf.NaturalGradientFlow(energy, nf.H1(k, alpha=1.0, beta=0.01), expansion=policy)
    res = flow.run(80)
    grown = [h for h in res.history if h.get("kind")]
    assert grown, "the flow stalled without growing"
    assert res.reason in ("stalled", "max_iter")
    flow.destroy()
    energy.destroy()


def _gn_run(comm, curvature="auto"):
    k, energy = darcy(comm=comm, width=5, nonlinear=True)
    flow = nf.NaturalGradientFlow(energy, nf.H1(k, alpha=1.0, beta=0.01), curvature=curvature)
    assert flow.curvature == ("projected" if curvature == "auto" else curvature)
    flow.run(4)
    theta, E = k.get_parameters(), [h["energy"] for h in flow.history]
    flow.destroy()
    energy.destroy()
    return theta, np.array(E)


@pytest.mark.parametrize("curvature", ["auto", "gauss-newton"])
def test_gauss_newton_parallel_matches_serial(curvature):
    th_self, E_self = _gn_run(MPI.COMM_SELF, curvature)
    th_world, E_world = _gn_run(MPI.COMM_WORLD, curvature)
    np.testing.assert_allclose(E_world, E_self, rtol=1e-8)
    np.testing.assert_allclose(th_world, th_self, rtol=0, atol=1e-6)


def test_expansion_is_a_step_of_the_flow_and_run_expansive_takes_a_callback():
    k, energy = darcy(width=2)
    policy = nf.ExpansionPolicy(threshold=1.0, patience=2, neurons=2)  # always due
    flow = nf.NaturalGradientFlow(energy, nf.H1(k), expansion=policy)
    seen = []
    res = nf.run_expansive(flow, policy, 5, callback=lambda fl, rec: seen.append(rec["iteration"]))
    assert seen == [0, 1, 2, 3, 4]
    grown = [h for h in res.history if h.get("kind") == "width"]
    assert grown and grown[0]["params_after"] == grown[0]["params_before"] + 8
    assert all(h["max_value_change"] <= 1e-12 for h in grown)
    assert k.num_params == 9 + 8 * len(grown)
    flow.destroy()
    energy.destroy()


def test_stop_decided_on_one_rank_stops_all():
    k, energy = darcy(width=3)
    flow = nf.NaturalGradientFlow(energy, nf.H1(k))
    res = flow.run(10, callback=lambda fl, rec: MPI.COMM_WORLD.rank == 0 and rec["iteration"] >= 1)
    assert res.reason == "callback" and res.iterations == 2
    flow.destroy()
    energy.destroy()


def test_nonfinite_energy_at_accepted_parameters_names_the_parts(monkeypatch):
    k, energy = darcy(width=3)
    flow = nf.NaturalGradientFlow(energy, nf.H1(k))
    flow.step()
    energy.value()
    monkeypatch.setattr(energy, "_last_misfit", math.inf)
    monkeypatch.setattr(flow, "_energy", math.inf)
    with pytest.raises(nf.FlowDivergedError, match="not finite.*misfit inf"):
        flow.step()
    flow.destroy()
    energy.destroy()


def test_flow_refuses_degenerate_settings():
    k, energy = darcy(width=2)
    for kwargs in ({"max_step": 0.0}, {"eps": 1e300}, {"curvature": "newton"},
                   {"max_cg": 0}, {"parameter_damping": -1.0}):
        with pytest.raises(ValueError):
            nf.NaturalGradientFlow(energy, **kwargs)
    flow = nf.NaturalGradientFlow(energy, eps=np.float32(1e-6), max_cg=np.int64(5))
    with pytest.raises(ValueError, match="checkpoint_every"):
        flow.run(2, checkpoint="x.pt", checkpoint_every=0)
    flow.destroy()
    energy.destroy()


def test_taylor_test_reads_rate_two_after_training_at_the_default_step():
    k, energy = darcy(width=4, points=True)
    flow = nf.NaturalGradientFlow(energy, nf.H1(k, alpha=1.0, beta=0.01))
    flow.run(6)
    res = nf.taylor_test(energy)
    assert res.min_rate >= 1.9, res
    assert res.rates.size == 4 and res.all_rates.size == 10
    plain = nf.taylor_test(energy, extra=0)
    assert plain.rates.size == 4
    flow.destroy()
    energy.destroy()


def test_nan_mesh_coordinates_are_blamed_on_the_mesh():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    if MPI.COMM_WORLD.rank == 0 and msh.geometry.x.shape[0]:
        msh.geometry.x[0, 0] = np.nan
    with pytest.raises(ValueError, match="mesh coordinates contain NaN"):
        nf.NeuralField(msh, nf.MLP(2, 3))


def test_misfit_after_a_rejected_trial_is_the_accepted_points():
    k, energy = darcy(width=4)
    flow = nf.NaturalGradientFlow(energy, nf.H1(k, alpha=1.0, beta=0.01))
    flow.step()
    E_acc, misfit_acc = energy.value(), energy.misfit_value()
    theta = k.get_parameters()
    solves = energy.pde_solves
    flow._restore(theta, E_acc)  # what every rejection does after its trials
    k.set_parameters(theta + 0.5)
    energy.value()  # a trial elsewhere
    flow._restore(theta, E_acc)
    assert energy.misfit_value() == pytest.approx(misfit_acc, rel=1e-12)
    assert energy.pde_solves == solves + 1  # the trial's forward solve, no re-solve
    flow.destroy()
    energy.destroy()


@pytest.mark.parametrize("kind", ["H1", "L2"])
def test_metric_block_product_equals_column_products(kind):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 10, 10)
    u = nf.NeuralField(msh, nf.MLP(2, 4))
    metric = nf.H1(u, alpha=1.0, beta=0.01) if kind == "H1" else nf.L2(u)
    W = np.random.default_rng(3 + MPI.COMM_WORLD.rank).standard_normal((u.local_size, 5))
    block = metric.apply_block(W)
    cols = np.column_stack([metric.apply(W[:, j]) for j in range(5)])
    np.testing.assert_allclose(block, cols, rtol=0, atol=1e-14)
    # kept operands: a second block of the same width (C or Fortran order), another width
    W2 = np.asfortranarray(2.0 * W[:, ::-1])
    np.testing.assert_allclose(metric.apply_block(W2), 2.0 * cols[:, ::-1], rtol=0, atol=1e-14)
    np.testing.assert_allclose(metric.apply_block(W[:, :2]), cols[:, :2], rtol=0, atol=1e-14)
    np.testing.assert_allclose(block, cols, rtol=0, atol=1e-14)  # results are copies
    metric.destroy()
    assert metric._blocks == {}


def test_derivative_cache_sees_point_data_changed_in_place():
    k, energy = darcy(width=3, points=True)
    energy.value()
    d1 = energy.derivative()
    adjoints = energy.counters["adjoint"]
    assert np.array_equal(energy.derivative(), d1)  # cached: no new adjoint solve
    assert energy.counters["adjoint"] == adjoints
    energy.observations.data[:] += 1.0
    d2 = energy.derivative()
    assert energy.counters["adjoint"] == adjoints + 1
    diff = MPI.COMM_WORLD.allreduce(float(np.sum(np.abs(d2 - d1))))
    assert diff > 0
    energy.destroy()
