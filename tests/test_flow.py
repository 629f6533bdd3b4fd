"""Natural-gradient flow: projection property, dense vs matrix-free, monotonicity, MPI."""

import nngf_fem as nf

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI


class FixedFeatures(torch.nn.Module):
    """Linear in its parameters: u(x) = tanh(x W + b) c with fixed W, b."""

    def __init__(self, width=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", 2 * torch.randn(2, width, generator=g))
        self.register_buffer("b", torch.randn(width, generator=g))
        self.c = torch.nn.Parameter(torch.randn(width, 1, generator=g))

    def forward(self, x):
        return torch.tanh(x @ self.W + self.b) @ self.c


def target(msh):
    x = ufl.SpatialCoordinate(msh)
    return ufl.sin(ufl.pi * x[0]) * x[1] ** 2


@pytest.mark.parametrize("metric_cls", [nf.H1, nf.L2])
@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_one_step_lands_on_projection_for_linear_model(metric_cls, method):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    field = nf.NeuralField(msh, FixedFeatures(), element=("Lagrange", 2))
    norm = "H1" if metric_cls is nf.H1 else "L2"
    energy = nf.RegressionEnergy(field, target(msh), norm=norm, quadrature_degree=6)
    metric = metric_cls(field)
    # reference: minimize 1/2 ||J c - f||_H^2 over c with the dense normal equations
    lin = field.linearize()
    G = nf.dense_gram(metric, lin)
    c0 = field.get_parameters()
    b0 = lin.vjp(energy.derivative())
    c_star = c0 - np.linalg.solve(G, b0)  # exact for a model linear in c
    flow = nf.NaturalGradientFlow(energy, metric, method=method, eps=0.0, eps_min=0.0,
                                  adapt_eps=False, max_step=1.0,
                                  petsc_options={"ksp_rtol": 1e-14, "ksp_max_it": 500})
    rec = flow.step()
    assert rec["accepted"] and rec["step"] == 1.0
    np.testing.assert_allclose(field.get_parameters(), c_star, rtol=1e-8, atol=1e-8)
    # at the projection the derivative is H-orthogonal to the tangent space
    b1 = field.linearize().vjp(energy.derivative())
    assert np.linalg.norm(b1) < 1e-8 * np.linalg.norm(b0)
    metric.destroy()


@pytest.mark.parametrize("rep,metric_cls", [("fe", nf.H1), ("fe", nf.L2), ("fe", nf.Euclidean),
                                            ("quadrature", nf.L2), ("quadrature", nf.H1)])
@pytest.mark.parametrize("precond", [None, "nystrom"])
def test_matrix_free_and_dense_directions_agree(rep, metric_cls, precond):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(0)
    field = nf.NeuralField(msh, nf.MLP(2, width=6, depth=2), representation=rep,
                           quadrature_degree=3)
    energy = nf.RegressionEnergy(field, target(msh), norm="L2")
    metric = metric_cls(field)
    flows = {m: nf.NaturalGradientFlow(energy, metric, method=m, eps=1e-4, alignment=False,
                                       preconditioner=precond, nystrom_rank=16,
                                       petsc_options={"ksp_rtol": 1e-14, "ksp_max_it": 2000})
             for m in ("dense", "krylov")}
    dirs = {m: f.direction()["d"] for m, f in flows.items()}
    np.testing.assert_allclose(dirs["krylov"], dirs["dense"], rtol=1e-8,
                               atol=1e-8 * np.abs(dirs["dense"]).max())
    metric.destroy()


def test_nystrom_preconditioner_full_rank_is_exact_inverse(rng):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 5, 5)
    torch.manual_seed(0)
    field = nf.NeuralField(msh, nf.MLP(2, width=3, depth=1), element=("Lagrange", 2))
    metric = nf.H1(field)
    op = nf.GramOperator(metric, field.linearize(), eps=1e-3)
    pre = nf.gram.NystromPreconditioner(op, rank=field.num_params)
    v = rng.standard_normal(field.num_params)
    scale = pre.lam[-1] + 1e-3
    np.testing.assert_allclose(pre.apply_full(op.apply(v)), scale * v, rtol=1e-6,
                               atol=1e-6 * scale * np.abs(v).max())
    # a low-rank sketch reduces CG iterations on the same system
    its = {}
    for precond in (None, "nystrom"):
        solver = nf.NaturalGradientSolver(metric, preconditioner=precond, nystrom_rank=8,
                                          petsc_options={"ksp_rtol": 1e-10})
        solver.solve(field.linearize(), v, 1e-6)
        its[precond] = solver.iterations
    assert its["nystrom"] < its[None]
    metric.destroy()


def test_kept_nystrom_sketch_gives_the_same_flow():
    """A sketch reused over several steps changes CG's path, not the directions."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    x = ufl.SpatialCoordinate(msh)
    runs = {}
    for refresh in (1, 4):
        torch.manual_seed(1)
        field = nf.NeuralField(msh, nf.MLP(2, width=8, depth=1), element=("Lagrange", 2))
        energy = nf.RegressionEnergy(field, abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1]))
        flow = nf.NaturalGradientFlow(energy, nf.H1(field), nystrom_refresh=refresh,
                                      nystrom_rank=16, petsc_options={"ksp_rtol": 1e-12})
        runs[refresh] = flow.run(8)
        flow.destroy()
    sketches = runs[4].column("sketch_products")
    assert np.count_nonzero(runs[1].column("sketch_products")) == 8
    assert 2 <= np.count_nonzero(sketches) < 8 and sketches[0] == 16
    # G + eps I is ill-conditioned (eps ~ 1e-6): CG stopped at 1e-12 differs in d by ~1e-6
    np.testing.assert_allclose(runs[4].column("energy"), runs[1].column("energy"), rtol=1e-4)


def test_energy_monotone_and_alignment_in_unit_interval():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    torch.manual_seed(1)
    field = nf.NeuralField(msh, nf.MLP(2, width=8, depth=1), element=("Lagrange", 2))
    x = ufl.SpatialCoordinate(msh)
    energy = nf.RegressionEnergy(field, abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1]), norm="H1")
    flow = nf.NaturalGradientFlow(energy, nf.H1(field))
    res = flow.run(15)
    E = np.array([h["energy_before"] for h in res.history] + [res.energy])
    assert np.all(np.diff(E) <= 0.0)
    assert E[-1] < 0.5 * E[0]
    a = res.column("alignment")
    assert np.all((a >= 0) & (a <= 1))
    assert len(res.history) == 15 and res.iterations == 15
    for key in ("t_pde", "t_riesz", "t_ng", "t_network", "ksp_its", "eps", "gnorm"):
        assert key in res.history[0]
    flow.destroy()


def test_alignment_is_one_when_gradient_is_in_tangent_space():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    field = nf.NeuralField(msh, FixedFeatures(seed=2))
    # target = the model with other coefficients, as a FE function: u - f lies in T
    other = nf.NeuralField(field.space, FixedFeatures(seed=2))
    other.set_parameters(field.get_parameters() + 0.3)
    f = fem.Function(field.space)
    f.x.array[:] = other.function.x.array
    energy = nf.RegressionEnergy(field, f, norm="H1", quadrature_degree=4)
    flow = nf.NaturalGradientFlow(energy, nf.H1(field), eps=1e-12, eps_min=1e-14,
                                  petsc_options={"ksp_rtol": 1e-14})
    rec = flow.step()
    assert rec["alignment"] == pytest.approx(1.0, abs=1e-6)
    flow.destroy()


def _run_flow(comm, steps=5):
    msh = mesh.create_unit_square(comm, 8, 8)
    torch.manual_seed(7)
    field = nf.NeuralField(msh, nf.MLP(2, width=6, depth=1), element=("Lagrange", 2))
    x = ufl.SpatialCoordinate(msh)
    energy = nf.RegressionEnergy(field, abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1]), norm="H1")
    flow = nf.NaturalGradientFlow(energy, nf.H1(field), petsc_options={"ksp_rtol": 1e-13})
    iterates = []
    for _ in range(steps):
        flow.step()
        iterates.append(field.get_parameters())
    flow.destroy()
    return np.array(iterates), np.array([h["energy"] for h in flow.history])


def test_parallel_iterates_match_serial():
    it_serial, E_serial = _run_flow(MPI.COMM_SELF)
    it_world, E_world = _run_flow(MPI.COMM_WORLD)
    np.testing.assert_allclose(it_world, it_serial, rtol=0, atol=1e-8)
    np.testing.assert_allclose(E_world, E_serial, rtol=1e-10)
    # parameters are replicated identically on every rank
    gathered = MPI.COMM_WORLD.allgather(it_world[-1])
    for g in gathered:
        np.testing.assert_array_equal(g, gathered[0])


@pytest.mark.parametrize("refresh", [1, 3])
def test_state_dict_roundtrip_reproduces_the_next_step(refresh):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(3)
    field = nf.NeuralField(msh, nf.MLP(2, width=5, depth=1))
    energy = nf.RegressionEnergy(field, target(msh), norm="L2")
    flow = nf.NaturalGradientFlow(energy, nf.L2(field), nystrom_refresh=refresh)
    flow.run(4)
    state = flow.state_dict()
    flow.step()
    ref = field.get_parameters()
    flow.solver._nystrom = None  # a fresh process has no sketch: the state must bring it
    flow.load_state_dict(state)
    flow.step()
    np.testing.assert_allclose(field.get_parameters(), ref, atol=1e-13)
    assert len(flow.history) == 5


def test_flow_input_validation():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 2, 2)
    field = nf.NeuralField(msh, nf.MLP(2, width=2))
    energy = nf.RegressionEnergy(field, target(msh))
    with pytest.raises(TypeError, match="EnergyFunctional"):
        nf.NaturalGradientFlow("not an energy")
    with pytest.raises(ValueError, match="eps"):
        nf.NaturalGradientFlow(energy, eps=-1.0)
    with pytest.raises(ValueError, match="method"):
        nf.NaturalGradientFlow(energy, method="cholesky")
    with pytest.raises(ValueError, match="max_iter"):
        nf.NaturalGradientFlow(energy).run(max_iter=-3)
    other = nf.NeuralField(msh, nf.MLP(2, width=2))
    with pytest.raises(ValueError, match="different field"):
        nf.NaturalGradientFlow(energy, nf.L2(other))
    with pytest.raises(ValueError, match="norm"):
        nf.RegressionEnergy(field, target(msh), norm="H2")
    bad = fem.Function(field.space)
    bad.x.array[:] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nf.RegressionEnergy(field, bad)


def _checkpoint_setup(expand):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(4)
    field = nf.NeuralField(msh, nf.MLP(2, width=2, depth=1), element=("Lagrange", 2))
    x = ufl.SpatialCoordinate(msh)
    energy = nf.RegressionEnergy(field, abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1]), norm="H1")
    flow = nf.NaturalGradientFlow(energy, nf.H1(field), petsc_options={"ksp_rtol": 1e-13})
    policy = nf.ExpansionPolicy(threshold=0.9, patience=2, neurons=2, n_candidates=64)
    def callback(fl, rec):
        if expand and policy.should_expand(fl):
            policy.expand(fl)

    return field, flow, callback


@pytest.mark.parametrize("expand", [False, True])
def test_checkpoint_resume_reproduces_uninterrupted_run(tempdir, expand):
    field, flow, cb = _checkpoint_setup(expand)
    flow.run(8, callback=cb)
    ref = field.get_parameters()
    # interrupted after 4 iterations, resumed in fresh objects
    field, flow, cb = _checkpoint_setup(expand)
    ckpt = tempdir / "ckpt.pt"
    flow.run(4, callback=cb, checkpoint=str(ckpt), checkpoint_every=2)
    field, flow, cb = _checkpoint_setup(expand)
    nf.load_checkpoint(ckpt, flow)
    assert flow.iteration == 4
    flow.run(8, callback=cb)
    assert field.get_parameters().shape == ref.shape
    np.testing.assert_allclose(field.get_parameters(), ref, rtol=0, atol=1e-12)
    if expand:
        assert any(h.get("kind") for h in flow.history)


def test_checkpoint_errors_are_clear(tempdir):
    field, flow, _ = _checkpoint_setup(False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        nf.load_checkpoint(tempdir / "missing.pt", flow)
    bad = tempdir / "bad.pt"
    if MPI.COMM_WORLD.rank == 0:
        bad.write_bytes(b"not a checkpoint")
    MPI.COMM_WORLD.Barrier()
    with pytest.raises(ValueError, match="checkpoint"):
        nf.load_checkpoint(bad, flow)


@pytest.mark.parametrize("name,opts", [("adam", {"lr": 1e-2}), ("lbfgs", {})])
def test_baselines_decrease_the_same_energy(name, opts):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(0)
    field = nf.NeuralField(msh, nf.MLP(2, width=5, depth=1))
    energy = nf.RegressionEnergy(field, target(msh), norm="H1")
    E0 = energy.value()
    opt = nf.TorchOptimizerFlow(energy, name, **opts)
    res = opt.run(10)
    assert res.energy < E0
    # the parameter gradient the optimizer sees is b = J^T e
    opt._closure()
    grad = torch.cat([p.grad.reshape(-1) for p in field.module.parameters()]).numpy()
    np.testing.assert_allclose(grad, field.linearize().vjp(energy.derivative()), atol=1e-14)
    with pytest.raises(ValueError, match="optimizer"):
        nf.TorchOptimizerFlow(energy, "sgd-momentum")


def test_point_regression_taylor_and_flow():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    torch.manual_seed(0)
    field = nf.NeuralField(msh, nf.MLP(2, width=6, depth=1), element=("Lagrange", 2))
    X = np.random.default_rng(3).random((60, 2))
    energy = nf.PointRegressionEnergy(field, X, np.sin(3 * X[:, 0]) * X[:, 1])
    assert nf.taylor_test(energy, h0=0.1).min_rate >= 1.9
    E0 = energy.value()
    res = nf.NaturalGradientFlow(energy, nf.L2(field)).run(10)
    assert res.energy < 0.1 * E0
    with pytest.raises(ValueError, match="outside"):
        nf.PointRegressionEnergy(field, [[2.0, 2.0]], [1.0])


def test_minres_option_gives_the_cg_direction():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(0)
    field = nf.NeuralField(msh, nf.MLP(2, width=5, depth=1))
    energy = nf.RegressionEnergy(field, target(msh), norm="H1")
    metric = nf.H1(field)
    d = {}
    for ksp in ("cg", "minres"):
        flow = nf.NaturalGradientFlow(energy, metric, eps=1e-4, preconditioner=None,
                                      petsc_options={"ksp_type": ksp, "ksp_rtol": 1e-13})
        d[ksp] = flow.direction()["d"]
    np.testing.assert_allclose(d["minres"], d["cg"], rtol=1e-7, atol=1e-9 * np.abs(d["cg"]).max())
    metric.destroy()


def test_ritz_with_inhomogeneous_dirichlet_lift():
    """u = x0 + x0(1-x0)x1(1-x1) N: harmonic data g = x0, f = 0, exact solution u = x0."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(0)
    field = nf.NeuralField(msh, nf.MLP(2, width=6, depth=1), element=("Lagrange", 2),
                           factor=lambda X: X[:, 0] * (1 - X[:, 0]) * X[:, 1] * (1 - X[:, 1]),
                           lift=lambda X: X[:, 0])
    x = ufl.SpatialCoordinate(msh)
    energy = nf.RitzEnergy(field, lambda a, b: ufl.inner(ufl.grad(a), ufl.grad(b)) * ufl.dx,
                           lambda w: fem.Constant(msh, 0.0) * w * ufl.dx)
    err = fem.form((field.ufl - x[0]) ** 2 * ufl.dx)
    e0 = MPI.COMM_WORLD.allreduce(fem.assemble_scalar(err))
    nf.NaturalGradientFlow(energy, nf.H1(field)).run(15)
    e1 = MPI.COMM_WORLD.allreduce(fem.assemble_scalar(err))
    assert e1 < 1e-6 * e0
    # boundary values are the lift's exactly
    X = field.points
    on_bnd = np.isclose(X, 0).any(axis=1) | np.isclose(X, 1).any(axis=1)
    np.testing.assert_allclose(field.values()[on_bnd], X[on_bnd, 0], atol=1e-14)


def test_stalled_flow_stops_with_reason_and_nonfinite_energy_raises():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    field = nf.NeuralField(msh, FixedFeatures(seed=1))
    f = fem.Function(field.space)
    f.x.array[:] = field.function.x.array  # already at the minimum: E = 0
    energy = nf.RegressionEnergy(field, f)
    res = nf.NaturalGradientFlow(energy, nf.L2(field), eps_max=1e-2).run(20)
    assert res.reason in ("stalled", "gtol") and res.iterations < 20
    bad = nf.RegressionEnergy(field, target(msh) / fem.Constant(msh, 0.0))
    with pytest.raises(nf.FlowDivergedError, match="not finite"):
        nf.NaturalGradientFlow(bad, nf.L2(field)).step()


@pytest.mark.parametrize("stop", ["gtol", "target_energy", "callback"])
def test_callback_sees_every_record_including_the_last(stop):
    """A user's callback annotates each record, also the one that ends the run."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    field = nf.NeuralField(msh, FixedFeatures(), element=("Lagrange", 2))
    energy = nf.RegressionEnergy(field, target(msh), quadrature_degree=6)
    flow = nf.NaturalGradientFlow(energy, nf.L2(field))
    seen = []

    def callback(fl, rec):
        rec["mine"] = len(seen)
        seen.append(rec["iteration"])
        return stop == "callback" and len(seen) == 3

    kwargs = {"gtol": 1e300} if stop == "gtol" else (
        {"target_energy": 1e300} if stop == "target_energy" else {})
    res = flow.run(10, callback=callback, **kwargs)
    assert res.reason == stop
    steps = [h for h in res.history if h.get("kind") is None]
    assert len(steps) == (3 if stop == "callback" else 1)
    assert [h["mine"] for h in steps] == list(range(len(steps)))
    flow.destroy()
