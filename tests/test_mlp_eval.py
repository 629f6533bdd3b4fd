"""The explicit MLP evaluator (values and J without torch modules) and the Riesz defaults."""

import nngf_fem as nf
from nngf_fem.curvature import fit_network
from nngf_fem.metrics import RIESZ_DIRECT, RIESZ_ITERATIVE, riesz_defaults
from nngf_fem.mlp_eval import MLPEvaluator
from nngf_fem.models import expand_width

import numpy as np
import pytest
import torch
from dolfinx import mesh
from mpi4py import MPI


def _field(widths, activation="tanh", transform="exp", n=5, seed=2, **kw):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, n, n)
    torch.manual_seed(seed)
    return nf.NeuralField(msh, nf.MLP(2, width=widths, activation=activation),
                          transform=transform, **kw)


def _reference(field):
    """Values and J through torch (module call and jacfwd), independent of the evaluator."""
    with torch.no_grad():
        v = field.evaluate(field.param_dict(), field._torch_points()).reshape(-1).numpy()
    jac = torch.func.jacfwd(field.flat_evaluator())(field.param_dict())
    J = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in jac], dim=1).numpy()
    return v, J


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus", "sin"])
@pytest.mark.parametrize("transform", ["identity", "exp", "softplus"])
@pytest.mark.parametrize("widths", [[5], [4, 3]])
def test_evaluator_matches_torch(activation, transform, widths, rng):
    kw = {"factor": lambda x: x[:, 0] * (1 - x[:, 0]), "lift": lambda x: 1 + x[:, 1]} \
        if transform == "identity" else {}
    field = _field(widths, activation, transform, **kw)
    theta = field.get_parameters() + 0.3 * rng.standard_normal(field.num_params)
    field.set_parameters(theta)
    ev = field.point_evaluator()
    assert isinstance(ev, MLPEvaluator)
    v_ref, J_ref = _reference(field)
    v, J = ev.jacobian(theta)
    assert J.flags.f_contiguous and J.shape == J_ref.shape
    scale = max(np.abs(J_ref).max(), 1e-300)
    assert np.abs(J - J_ref).max() <= 1e-13 * scale
    assert np.allclose(v, v_ref, rtol=1e-14, atol=1e-14)
    assert np.allclose(ev.values(theta), v_ref, rtol=1e-14, atol=1e-14)
    assert np.allclose(field.values(), v_ref, rtol=1e-14, atol=1e-14)
    # the field's own Jacobian (Linearization) uses the evaluator
    assert np.abs(field.linearize().J - J_ref).max() <= 1e-13 * scale


def test_evaluator_with_an_initial_guess():
    """The offset of a non-constant initial guess enters the values and the Jacobian."""
    field = _field([6], initial=lambda x: 1.0 + x[:, 0] ** 2)
    k0 = 1.0 + field.points[:, 0] ** 2
    assert np.allclose(field.values(), k0, rtol=1e-14)
    v_ref, J_ref = _reference(field)
    v, J = field.point_evaluator().jacobian(field.get_parameters())
    assert np.allclose(v, v_ref, rtol=1e-14) and np.allclose(J, J_ref, rtol=1e-13, atol=1e-15)


def test_evaluator_not_used_where_it_does_not_apply():
    assert _field([4], activation="gelu").point_evaluator() is None
    assert _field([4], transform=torch.exp).point_evaluator() is None  # a callable transform
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    assert nf.NeuralField(msh, nf.ResMLP(2, width=4, depth=1)).point_evaluator() is None
    assert nf.NeuralField(msh, nf.MLP(2, width=3, out_dim=2),
                          element=("Lagrange", 1, (2,))).point_evaluator() is None


def test_evaluator_follows_growth_and_cache_is_safe(rng):
    field = _field([3])
    ev = field.point_evaluator()
    theta = field.get_parameters()
    u = ev.values(theta)
    theta_mut = theta.copy()
    v1, _ = ev.jacobian(theta_mut)
    theta_mut[:] = 0.0  # the kept sweep must not alias the caller's array
    assert np.array_equal(ev.values(theta), u) and np.array_equal(v1, u)
    v1[:] = -1.0  # nor hand out its own arrays
    assert np.array_equal(ev.values(theta), u)
    W, beta = rng.standard_normal((2, 2)), rng.standard_normal(2)
    expand_width(field.module, 0, W, beta)
    ev2 = field.point_evaluator()
    assert ev2 is not ev and ev2.num_params == field.num_params
    assert np.allclose(field.values(), u, rtol=1e-14)  # function-preserving growth


def test_fit_with_and_without_evaluator(monkeypatch, rng):
    """The network fit gives the same result through the evaluator and through torch."""
    field = _field([6])
    metric = nf.H1(field, beta=0.01)
    theta0 = field.get_parameters()
    x = field.points
    target = np.exp(0.3 * np.sin(3 * x[:, 0]) * x[:, 1])
    out = fit_network(field, metric, target, 1e-6, max_it=6, rtol=0.0)
    theta_fast = field.get_parameters()
    field.set_parameters(theta0)
    monkeypatch.setattr(field, "point_evaluator", lambda: None)
    out_torch = fit_network(field, metric, target, 1e-6, max_it=6, rtol=0.0)
    assert out["fit_iterations"] == out_torch["fit_iterations"] == 6
    assert out["fit_residual"] < 0.9
    assert np.allclose(out["fit_residual"], out_torch["fit_residual"], rtol=1e-8)
    assert np.allclose(field.get_parameters(), theta_fast, rtol=1e-7, atol=1e-9)
    metric.destroy()


def test_riesz_defaults_and_direct_equals_iterative(rng):
    field = _field([3], n=6)
    H = nf.H1(field, beta=0.1)
    serial = MPI.COMM_WORLD.size == 1
    assert riesz_defaults(H.A) == (RIESZ_DIRECT if serial else RIESZ_ITERATIVE)
    assert riesz_defaults(H.A, {"pc_type": "gamg"}) == RIESZ_ITERATIVE
    assert riesz_defaults(H.A, {"ksp_rtol": 1e-14}) == RIESZ_ITERATIVE
    H_it = nf.H1(field, beta=0.1, petsc_options={"ksp_type": "cg", "pc_type": "gamg",
                                                 "ksp_rtol": 1e-14})
    e = rng.standard_normal(field.local_size)
    g, g_it = H.riesz(e), H_it.riesz(e)
    assert H_it.riesz_iterations > 1
    assert H.riesz_iterations == (1 if serial else H.riesz_iterations)
    scale = np.sqrt(H.dual_norm_squared(e, g))
    diff = np.sqrt(max(H.inner(g - g_it, g - g_it), 0.0))
    assert diff <= 1e-10 * scale
    H.destroy()
    H_it.destroy()


def test_many_live_riesz_factorizations():
    """Hundreds of metrics alive at once (not destroyed) do not exhaust MPI communicators.

    A MUMPS factorization holds communicators of its own; 600 live ones used to end the
    job with "Too many communicators" far from the cause.
    """
    field = _field([3], n=4)
    e = np.ones(field.local_size)
    metrics = []
    for _ in range(600):
        metrics.append(nf.H1(field))
        metrics[-1].riesz(e)
    g = metrics[-1].riesz(e)
    assert np.all(np.isfinite(g))
    for m in metrics:
        m.destroy()


def test_evaluator_on_a_rank_without_points(rng):
    """A rank that owns no points gets empty values and a 0-row Jacobian (no error)."""
    ev = MLPEvaluator(np.zeros((0, 2)), [(4, 2), (3, 4), (1, 3)], "tanh", "exp")
    theta = rng.standard_normal(ev.num_params)
    u, J = ev.jacobian(theta)
    assert u.shape == (0,) and J.shape == (0, ev.num_params)
    assert ev.values(theta).shape == (0,) and ev.output_sensitivity(theta).shape == (0,)
