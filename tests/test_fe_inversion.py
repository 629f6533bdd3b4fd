"""FE coefficient control and TAO L-BFGS: Taylor rates, J0 = metric, MPI agreement, mistakes."""

import nngf_fem as nf

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI


def k_true_expr(x):
    return ufl.exp(0.5 * ufl.sin(2 * ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1]))


def darcy(comm=MPI.COMM_WORLD, n=8, transform="exp", alpha=1e-6, noise=0.01):
    """Darcy inversion with synthetic noisy data; returns (control, energy, k_true)."""
    msh = mesh.create_unit_square(comm, n, n)
    x = ufl.SpatialCoordinate(msh)
    k = nf.FEControl(msh, transform=transform, name="k")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - 10.0 * v * ufl.dx
    msh.topology.create_connectivity(1, 2)
    bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(
        V, 1, mesh.exterior_facet_indices(msh.topology)), V)
    k_true = fem.Function(k.space, name="k_true")
    k_true.interpolate(fem.Expression(k_true_expr(x), k.space.element.interpolation_points))
    probe = nf.PDEConstrainedEnergy(F, y, [bc], control=k, misfit=0.5 * y**2 * ufl.dx)
    y_obs = nf.add_noise(nf.pde.synthetic_state(probe, k_true), noise, seed=3)
    probe.destroy()
    y.x.array[:] = 0.0
    reg = None if alpha is None else nf.Tikhonov(alpha, "H1", reference=1.0)
    energy = nf.PDEConstrainedEnergy(F, y, [bc], control=k, misfit=0.5 * (y - y_obs) ** 2 * ufl.dx,
                                     regularization=reg)
    return k, energy, k_true


def l2_norm(expr, comm) -> float:
    return float(np.sqrt(comm.allreduce(fem.assemble_scalar(fem.form(ufl.inner(expr, expr)
                                                                      * ufl.dx)))))


@pytest.mark.parametrize("transform", ["identity", "exp", "softplus"])
def test_taylor_reduced_derivative_wrt_m(transform):
    k, energy, _ = darcy(transform=transform)
    if transform == "identity":
        k.set_m(np.full(k.local_size, 1.5))
    x = k.space.tabulate_dof_coordinates()[: k.n_points]
    k.set_m(k.get_m() + 0.3 * np.sin(3 * x[:, 0]) * x[:, 1])  # a non-constant point
    m0 = k.get_m()
    res = nf.fe_taylor_test(energy, h0=0.1)
    assert res.min_rate >= 1.9, res
    assert np.array_equal(k.get_m(), m0)  # the control is restored
    energy.destroy()


def test_set_k_inverts_transform_and_update_is_nodal():
    k, energy, k_true = darcy(transform="softplus")
    k.set_k(k_true)
    assert np.allclose(k.values(), k.read(k_true), rtol=1e-12)
    assert np.allclose(k.function.x.array, k_true.x.array, rtol=1e-12)  # ghosts too
    assert np.allclose(k.pullback(np.ones(k.local_size)), k.transform_derivative())
    energy.destroy()


def test_metric_as_initial_hessian_gives_newton_step():
    """E = 1/2 ||m - f||_H1^2 has Hessian A_H: with J0 = A_H, one L-BFGS step is exact."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 10, 10)
    x = ufl.SpatialCoordinate(msh)
    m = nf.FEControl(msh, transform="identity", name="m")
    energy = nf.RegressionEnergy(m, ufl.sin(3 * x[0]) * x[1], norm="H1", alpha=1.0, beta=0.5)
    solver = nf.TaoSolver(energy, alpha=1.0, beta=0.5, riesz_options={"ksp_rtol": 1e-14})
    result = solver.run(10, gatol=1e-9)
    assert result.converged and result.reason == "CONVERGED_GATOL", result.reason
    assert result.iterations == 1
    assert result.history[0]["gnorm"] > 1e-3 > 1e-9 >= result.history[-1]["gnorm"]
    solver.destroy()


def _run_darcy(comm, iterations=12):
    k, energy, k_true = darcy(comm, n=10)
    solver = nf.TaoSolver(energy, alpha=1.0, beta=0.01)
    result = solver.run(iterations)
    k_err = l2_norm(k.ufl - k_true, comm) / l2_norm(k_true, comm)
    m_norm = l2_norm(k.m, comm)
    out = {"E": result.column("energy"), "misfit": result.column("misfit"),
           "pde": result.column("pde_solves"), "k_err": k_err, "m_norm": m_norm,
           "reason": result.reason, "converged": result.converged}
    solver.destroy()
    energy.destroy()
    return out


def test_tao_lmvm_decreases_energy_and_matches_serial():
    par = _run_darcy(MPI.COMM_WORLD)
    E = par["E"]
    assert np.all(np.diff(E) <= 1e-14 * E[0]), E
    assert E[-1] < 0.2 * E[0]
    assert par["k_err"] < 0.2
    assert par["reason"] == "DIVERGED_MAXITS" and not par["converged"]  # recorded, not hidden
    assert np.all(np.diff(par["pde"]) >= 2)  # forward + adjoint per evaluation
    if MPI.COMM_WORLD.size > 1:  # the same problem on one rank (every rank alone)
        ser = _run_darcy(MPI.COMM_SELF)
        assert np.allclose(par["E"], ser["E"], rtol=1e-7, atol=0)
        assert np.allclose(par["misfit"], ser["misfit"], rtol=1e-6, atol=0)
        assert par["k_err"] == pytest.approx(ser["k_err"], rel=1e-6)
        assert par["m_norm"] == pytest.approx(ser["m_norm"], rel=1e-7)
        assert np.array_equal(par["pde"], ser["pde"])


def test_gauss_newton_hessian_is_exact_at_zero_residual():
    """With noise-free data at the true m and no regularization, H_GN is the Hessian."""
    comm = MPI.COMM_WORLD
    k, energy, k_true = darcy(n=8, alpha=None, noise=0.0)
    k.set_k(k_true)
    gn = nf.GaussNewtonCG(energy)
    gn.update_operators()
    x = k.space.tabulate_dof_coordinates()[: k.n_points]
    dm = np.sin(2 * x[:, 0] + x[:, 1])
    Hdm = gn.hessian_action(dm)
    m0, h = k.get_m(), 1e-4
    grads = []
    for s in (1.0, -1.0):
        k.set_m(m0 + s * h * dm)
        energy.value()
        grads.append(k.pullback(energy.derivative()))
    fd = (grads[0] - grads[1]) / (2 * h)
    err = np.sqrt(comm.allreduce(float(np.sum((Hdm - fd) ** 2))))
    ref = np.sqrt(comm.allreduce(float(np.sum(fd**2))))
    assert err <= 1e-5 * ref, (err, ref)
    assert energy.counters["incremental_forward"] == energy.counters["incremental_adjoint"] == 1
    gn.destroy()
    energy.destroy()


def _run_gn(comm):
    k, energy, k_true = darcy(comm, n=10)
    gn = nf.GaussNewtonCG(energy, alpha=1.0, beta=0.01)
    result = gn.run(4)
    assert result.reason == "max_iter" and not result.converged
    out = {"E": result.column("energy"), "pde": result.column("pde_solves"),
           "cg": result.column("cg_its"),
           "k_err": l2_norm(k.ufl - k_true, comm) / l2_norm(k_true, comm)}
    with pytest.raises(nf.SolverError, match="max_iter"):
        gn.run(0, raise_on_failure=True)
    gn.destroy()
    energy.destroy()
    return out


def test_gauss_newton_cg_decreases_energy_and_matches_serial():
    par = _run_gn(MPI.COMM_WORLD)
    assert np.all(np.diff(par["E"]) < 0) and par["E"][-1] < 0.1 * par["E"][0]
    assert par["k_err"] < 0.2
    assert np.all(np.diff(par["pde"]) >= 2 + 2 * par["cg"][1:])  # 2 solves per CG iteration
    if MPI.COMM_WORLD.size > 1:
        ser = _run_gn(MPI.COMM_SELF)
        assert np.allclose(par["E"], ser["E"], rtol=1e-7, atol=0)
        assert np.array_equal(par["cg"], ser["cg"])
        assert par["k_err"] == pytest.approx(ser["k_err"], rel=1e-6)


def test_callback_stops_and_failure_is_raised_on_request():
    k, energy, _ = darcy()
    solver = nf.TaoSolver(energy, alpha=1.0, beta=0.01)
    seen = []

    def stop_at_3(s, rec):
        seen.append(rec["iteration"])
        return rec["iteration"] >= 3

    result = solver.run(50, callback=stop_at_3)
    assert result.converged and result.reason == "CONVERGED_USER"
    assert seen == [0, 1, 2, 3] and result.iterations == 3
    assert energy.value() == pytest.approx(result.history[-1]["energy"], rel=1e-12)
    with pytest.raises(nf.SolverError, match="DIVERGED_MAXITS"):
        solver.run(1, raise_on_failure=True)
    assert solver.reason == "DIVERGED_MAXITS" and not solver.converged
    solver.destroy()
    energy.destroy()


def test_bad_input_raises_on_all_ranks():
    comm = MPI.COMM_WORLD
    k, energy, k_true = darcy(n=6)
    other = fem.Function(fem.functionspace(k.mesh, ("Lagrange", 2)), name="q")
    with pytest.raises(ValueError, match="k 'q' must be a Function on the control's space"):
        k.set_k(other)
    bad = k.get_m()
    if comm.rank == 0 and bad.size:
        bad[0] = np.nan
    with pytest.raises(ValueError, match="m contains NaN/Inf"):
        k.set_m(bad)
    with pytest.raises(ValueError, match="local shape"):
        k.set_m(np.zeros(k.local_size + 1))
    with pytest.raises(ValueError, match="outside the range"):
        k.set_k(-np.ones(k.local_size))  # log of negative permeability
    with pytest.raises(ValueError, match="k_true must be a Function on the control's space"):
        nf.pde.synthetic_state(energy, other)
    with pytest.raises(ValueError, match="Lagrange-type"):
        nf.FEControl(fem.functionspace(k.mesh, ("N1curl", 1)))
    with pytest.raises(ValueError, match="transform='log' is not known"):
        nf.FEControl(k.mesh, transform="log")
    wrong = nf.H1(nf.FEControl(other.function_space))
    with pytest.raises(ValueError, match="metric is defined on another control"):
        nf.TaoSolver(energy, metric=wrong)
    with pytest.raises(ValueError, match="metric is defined on another control"):
        nf.GaussNewtonCG(energy, metric=wrong)
    wrong.destroy()
    with pytest.raises(TypeError, match="metric must be an nngf_fem Metric"):
        nf.TaoSolver(energy, metric=np.eye(3))
    with pytest.raises(ValueError, match="max_iter"):
        solver = nf.TaoSolver(energy)
        try:
            solver.run(-1)
        finally:
            solver.destroy()
    torch.manual_seed(0)
    net = nf.NeuralField(k.mesh, nf.MLP(2, width=2, depth=1))
    with pytest.raises(TypeError, match="FEControl"):
        nf.TaoSolver(nf.RegressionEnergy(net, 1.0))
    energy.destroy()
