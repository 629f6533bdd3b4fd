"""Width expansion: function preserving, residual driven, identical on all ranks."""

import nngf_fem as nf
from nngf_fem.expansion import (
    ExpansionPolicy,
    _candidate_directions,
    expand_width,
    run_expansive,
    width_candidates,
)

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI


def setup(n=8, width=3, seed=0, target=None):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, n, n)
    torch.manual_seed(seed)
    u = nf.NeuralField(msh, nf.MLP(2, width=width, depth=1), element=("Lagrange", 2))
    x = ufl.SpatialCoordinate(msh)
    f = abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1]) if target is None else target(u)
    energy = nf.RegressionEnergy(u, f, norm="H1", quadrature_degree=5)
    flow = nf.NaturalGradientFlow(energy, nf.H1(u), eps=1e-10, eps_min=1e-12,
                                  petsc_options={"ksp_rtol": 1e-14, "ksp_max_it": 3000})
    return u, energy, flow


def test_expansion_preserves_function_and_raises_alignment():
    u, energy, flow = setup()
    flow.run(3)
    vals = u.values()
    policy = ExpansionPolicy(neurons=3, n_candidates=128, seed=1)
    rec = policy.expand(flow)
    np.testing.assert_allclose(u.values(), vals, rtol=0, atol=1e-14)
    assert rec["max_value_change"] <= 1e-14
    assert rec["params_after"] == rec["params_before"] + 3 * 4
    assert rec["alignment_after"] >= rec["alignment_before"] - 1e-12
    assert u.module.widths == [6]
    # identical parameters on all ranks
    theta = u.get_parameters()
    for other in MPI.COMM_WORLD.allgather(theta):
        np.testing.assert_array_equal(other, theta)
    # the flow continues with the grown network
    E0 = energy.value()
    flow.run(flow.iteration + 2)
    assert energy.value() <= E0


def test_residual_equal_to_a_candidate_is_captured_exactly():
    """Target = current network + one candidate neuron: one width step gives alignment 1."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    torch.manual_seed(0)
    u = nf.NeuralField(msh, nf.MLP(2, width=1, depth=1), element=("Lagrange", 2))
    policy = ExpansionPolicy(neurons=1, n_candidates=64, seed=5)
    W, beta = width_candidates(u, 0, 64, policy.seed)
    c = int(np.argmax(np.linalg.norm(W, axis=1)))  # a sharp neuron, far from the tangent space
    # a FE target f = u + 0.3 n_c (n_c a candidate direction at the nodes)
    n7 = _candidate_directions(u, 0, W, beta)[:, c]
    f = fem.Function(u.space)
    u.write(u.values() - 0.3 * n7, f)
    energy = nf.RegressionEnergy(u, f, norm="H1", quadrature_degree=4)
    flow = nf.NaturalGradientFlow(energy, nf.H1(u), eps=1e-12, eps_min=1e-14,
                                  petsc_options={"ksp_rtol": 1e-15, "ksp_max_it": 5000})
    rec = policy.expand(flow)
    assert rec["alignment_before"] < 0.99
    assert rec["alignment_after"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(u.module.hidden_layers[0].weight[-1].detach().numpy(), W[c])


def test_expansive_run_from_two_neurons_grows_and_decreases_energy():
    u, energy, flow = setup(width=2)
    flow.eps = 1e-6
    E0 = energy.value()
    policy = ExpansionPolicy(threshold=0.6, patience=2, neurons=2, n_candidates=128)
    res = run_expansive(flow, policy, max_iter=12)
    exps = [h for h in res.history if h.get("kind") == "width"]
    assert exps, "no expansion happened"
    assert u.module.widths[0] > 2
    assert res.energy < 0.5 * E0
    steps = [h for h in res.history if h.get("kind") is None]
    E = [h["energy"] for h in steps]
    assert all(b <= a for a, b in zip(E, E[1:], strict=False))


def test_expand_width_on_inner_layer_is_function_preserving():
    torch.manual_seed(0)
    net = nf.MLP(2, width=[4, 3], out_dim=1)
    x = torch.rand(50, 2, dtype=torch.float64)
    y0 = net(x).detach()
    expand_width(net, 0, np.random.default_rng(0).standard_normal((2, 2)), np.zeros(2))
    assert net.widths == [6, 3]
    torch.testing.assert_close(net(x).detach(), y0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("model", ["mlp", "resmlp"])
def test_depth_then_width_growth_is_function_preserving(model):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(2)
    net = nf.MLP(2, width=3, depth=1) if model == "mlp" else nf.ResMLP(2, width=3, depth=1)
    u = nf.NeuralField(msh, net, element=("Lagrange", 2))
    x = ufl.SpatialCoordinate(msh)
    energy = nf.RegressionEnergy(u, ufl.sin(3 * x[0]) * x[1], norm="H1", quadrature_degree=4)
    flow = nf.NaturalGradientFlow(energy, nf.H1(u), eps=1e-10, eps_min=1e-12,
                                  petsc_options={"ksp_rtol": 1e-14, "ksp_max_it": 3000})
    flow.run(2)
    policy = ExpansionPolicy(neurons=2, n_candidates=64, kinds=("depth", "width"))
    for expected in ("depth", "width"):
        vals = u.values()
        rec = policy.expand(flow)
        assert rec["kind"] == expected
        np.testing.assert_allclose(u.values(), vals, rtol=0, atol=1e-14)
        assert rec["alignment_after"] >= rec["alignment_before"] - 1e-10
    assert len(net.blocks) == (1 if model == "mlp" else 2)
    E = energy.value()
    flow.run(flow.iteration + 2)
    assert energy.value() <= E


def test_policy_triggers_and_validation():
    with pytest.raises(ValueError, match="kind"):
        ExpansionPolicy(kinds=("height",))
    u, energy, flow = setup(width=2)
    flow.eps = 1e-6
    policy = ExpansionPolicy(threshold=0.0, patience=2, stall=1.0)  # stall always true
    flow.run(1)
    assert not policy.should_expand(flow)
    flow.run(flow.iteration + 1)
    assert policy.should_expand(flow)
    policy.expand(flow)
    assert not policy.should_expand(flow)  # patience counts from the expansion
