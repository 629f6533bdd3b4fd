"""Parametric fields u(x; mu): stacked Jacobian, product metric, energies, flow, expansion."""

import nngf_fem as nf
from nngf_fem.mpi import allreduce_sum

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI

MUS = np.array([[0.3, 1.0], [0.5, 2.0], [0.7, 0.5]])


def make(comm=MPI.COMM_WORLD, representation="fe", width=5, seed=2, n=5, **kw):
    msh = mesh.create_unit_square(comm, n, n)
    torch.manual_seed(seed)
    net = nf.MLP(4, width=width, depth=2)
    return nf.ParametricField(msh, net, MUS, representation=representation,
                              transform="softplus", **kw)


def snapshots(field):
    """Targets f(x; mu) = mu_1 sin(pi x) y + mu_0 (interpolated, one per sample)."""
    out = []
    for s, mu in zip(field.samples, field.mus, strict=True):
        x = ufl.SpatialCoordinate(field.mesh)
        expr = mu[1] * ufl.sin(ufl.pi * x[0]) * x[1] + mu[0]
        if field.representation == "fe":
            f = fem.Function(s.space)
            f.interpolate(fem.Expression(expr, s.space.element.interpolation_points))
            out.append(f)
        else:
            out.append(expr)
    return out


def test_values_match_per_sample_fields():
    field = make()
    ref = [nf.NeuralField(field.space, field.module, mu=mu, transform="softplus")
           for mu in MUS]
    for s, r in zip(field.samples, ref, strict=True):
        np.testing.assert_allclose(s.function.x.array, r.function.x.array, atol=1e-14)
    u = field.predict(MUS[1])
    np.testing.assert_allclose(u.x.array, ref[1].function.x.array, atol=1e-14)


@pytest.mark.parametrize("rep,metric,kw", [("fe", nf.H1, {"beta": 0.5}),
                                           ("fe", nf.L2, {}),
                                           ("quadrature", nf.H1, {}),
                                           ("quadrature", nf.L2, {})])
def test_product_gram_is_sum_of_sample_grams(rep, metric, kw, rng):
    field = make(representation=rep)
    weights = [0.2, 0.5, 0.3]
    pm = nf.ProductMetric(field, metric, sample_weights=weights, **kw)
    lin = field.linearize(with_grad=pm.needs_grad)
    v = rng.standard_normal(field.num_params)
    v = MPI.COMM_WORLD.bcast(v, root=0)
    Gv = nf.GramOperator(pm, lin).apply(v)
    ref = np.zeros_like(v)
    for w, mu in zip(weights, MUS, strict=True):
        s = nf.NeuralField(field.space if rep == "fe" else field.mesh, field.module, mu=mu,
                           transform="softplus", representation=rep)
        m = metric(s, **kw)
        ls = s.linearize(with_grad=m.needs_grad)
        ref += w * ls.vjp(m.apply(ls.jvp(v)))
        m.destroy()
    np.testing.assert_allclose(Gv, ref, rtol=1e-11, atol=1e-13)
    # the dense stacked Jacobian agrees with the products
    J = field.jacobian(with_grad=pm.needs_grad)
    np.testing.assert_allclose(J @ v, lin.jvp(v), atol=1e-12)
    w = rng.standard_normal(lin.n_rows)
    np.testing.assert_allclose(allreduce_sum(field.comm, J.T @ w), lin.vjp(w), atol=1e-11)
    pm.destroy()


def test_riesz_of_product_metric():
    field = make()
    pm = nf.ProductMetric(field, nf.H1, sample_weights=[1.0, 2.0, 4.0])
    e = np.concatenate([np.random.default_rng(i).standard_normal(s.local_size)
                        for i, s in enumerate(field.samples)])
    g = pm.riesz(e)
    np.testing.assert_allclose(pm.apply(g), e, atol=1e-8)
    assert pm.dual_norm_squared(e, g) == pytest.approx(pm.inner(g, g), rel=1e-8)
    pm.destroy()


@pytest.mark.parametrize("norm", ["L2", "H1"])
def test_parametric_regression_taylor(norm):
    field = make()
    energy = nf.ParametricRegressionEnergy(field, snapshots(field), norm=norm,
                                           sample_weights=[0.5, 0.25, 0.25])
    res = nf.taylor_test(energy)
    assert min(res.rates) > 1.9, res.rates
    parts = energy.sample_values()
    assert energy.value() == pytest.approx(0.5 * parts[0] + 0.25 * (parts[1] + parts[2]))


def _flow_run(comm, steps=6):
    field = make(comm)
    energy = nf.ParametricRegressionEnergy(field, snapshots(field), norm="H1")
    flow = nf.NaturalGradientFlow(energy, petsc_options={"ksp_rtol": 1e-13})
    assert isinstance(flow.metric, nf.ProductMetric)
    E = [energy.value()]
    flow.run(steps)
    E += [h["energy"] for h in flow.history]
    theta = field.get_parameters()
    flow.destroy()
    return theta, E


def test_flow_decreases_and_parallel_matches_serial():
    th_s, E_s = _flow_run(MPI.COMM_SELF)
    th_w, E_w = _flow_run(MPI.COMM_WORLD)
    assert all(b <= a for a, b in zip(E_w, E_w[1:], strict=False))
    assert E_w[-1] < 0.5 * E_w[0], E_w
    np.testing.assert_allclose(E_w, E_s, rtol=1e-10)
    np.testing.assert_allclose(th_w, th_s, atol=1e-8)


def test_dense_and_krylov_directions_agree():
    field = make()
    energy = nf.ParametricRegressionEnergy(field, snapshots(field), norm="L2")
    d = []
    for method in ("dense", "krylov"):
        flow = nf.NaturalGradientFlow(energy, nf.ProductMetric(field, nf.L2), method=method,
                                      eps=1e-6, petsc_options={"ksp_rtol": 1e-14})
        d.append(flow.direction()["d"])
        flow.metric.destroy()
    np.testing.assert_allclose(d[0], d[1], rtol=1e-7, atol=1e-9)


def test_expansion_and_checkpoint_of_parametric_field(tempdir):
    field = make(width=3)
    energy = nf.ParametricRegressionEnergy(field, snapshots(field), norm="H1")
    flow = nf.NaturalGradientFlow(energy, eps=1e-8)
    flow.run(2)
    vals = field.values()
    rec = nf.ExpansionPolicy(neurons=2, n_candidates=64, layer=1).expand(flow)
    np.testing.assert_allclose(field.values(), vals, atol=1e-13)
    assert rec["params_after"] > rec["params_before"]
    assert rec["alignment_after"] >= rec["alignment_before"] - 1e-12
    for s in field.samples:
        assert s.module is field.module
    flow.run(4)
    nf.save_checkpoint(tempdir / "c.pt", flow)
    theta = field.get_parameters()
    field2 = make(width=3)
    flow2 = nf.NaturalGradientFlow(nf.ParametricRegressionEnergy(field2, snapshots(field2)))
    nf.load_checkpoint(tempdir / "c.pt", flow2)
    np.testing.assert_allclose(field2.get_parameters(), theta, atol=0)
    np.testing.assert_allclose(field2.samples[2].function.x.array,
                               field.samples[2].function.x.array, atol=1e-14)


def test_parametric_input_errors():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 2, 2)
    net = nf.MLP(4, width=2)
    with pytest.raises(ValueError, match="NaN"):
        nf.ParametricField(msh, net, [[0.1, np.nan]])
    with pytest.raises(ValueError, match="shape"):
        nf.ParametricField(msh, net, np.zeros((0, 2)))
    with pytest.raises(TypeError, match="mus"):
        nf.ParametricField(msh, net, MUS, mu=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        nf.ParametricField(msh, net, [[0.1], [0.2]])
    field = nf.ParametricField(msh, net, MUS)
    with pytest.raises(ValueError, match="one snapshot per sample"):
        nf.ParametricRegressionEnergy(field, snapshots(field)[:2])
    with pytest.raises(ValueError, match="samples\\[1\\]"):
        energies = [nf.RegressionEnergy(field.samples[0], 1.0) for _ in range(3)]
        nf.ParametricEnergy(field, energies)
    with pytest.raises(ValueError, match="positive"):
        nf.ProductMetric(field, nf.L2, sample_weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="entries"):
        field.predict([0.1])
