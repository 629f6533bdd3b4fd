"""Neural fields, metrics, Gram products and Riesz maps (METHOD.md sections 1 and 3)."""

import nngf_fem as nf
from nngf_fem.mpi import allreduce_sum

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI


def make_field(comm, representation="fe", n=4, element=None, out_dim=1, width=5, seed=3, **kw):
    msh = mesh.create_unit_square(comm, n, n)
    torch.manual_seed(seed)
    net = nf.MLP(2, width=width, depth=2, out_dim=out_dim)
    return nf.NeuralField(msh, net, representation=representation, element=element, **kw)


def make_metric(kind, field):
    if kind == "L2":
        return nf.L2(field)
    if kind == "L2w":
        x = ufl.SpatialCoordinate(field.mesh)
        return nf.L2(field, weight=1.0 + x[0] ** 2)
    if kind == "H1":
        return nf.H1(field, alpha=1.0, beta=0.5)
    if kind == "energy":
        V = field.space
        msh = field.mesh
        msh.topology.create_connectivity(1, 2)
        facets = mesh.exterior_facet_indices(msh.topology)
        bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(V, 1, facets), V)
        return nf.H1Seminorm(field, bcs=[bc])
    if kind == "euclidean":
        return nf.Euclidean(field)
    raise AssertionError(kind)


FIELD_CASES = [
    ("fe", None, 1),
    ("fe", ("Lagrange", 2), 1),
    ("fe", ("Lagrange", 1, (2,)), 2),
    ("quadrature", None, 1),
    ("quadrature", None, 2),
]


def reference_jacobian(field, with_grad=False):
    """J by torch.func.jacfwd of the flat evaluator (independent of the library's paths)."""
    jac = torch.func.jacfwd(field.flat_evaluator(with_grad))(field.param_dict())
    return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in jac], dim=1).numpy()


class ScaledSine(torch.nn.Module):
    """A module with a parameter outside nn.Linear (the vmap path of the Jacobian)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 4, dtype=torch.float64)
        self.scale = torch.nn.Parameter(torch.tensor([1.5, -0.5, 0.7, 2.0], dtype=torch.float64))

    def forward(self, x):
        return (self.scale * torch.sin(self.lin(x))).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("rep,element,m", FIELD_CASES)
@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("cache_mb", [0.0, None])
def test_jvp_vjp_match_dense_jacobian(rep, element, m, with_grad, cache_mb, rng):
    if with_grad and rep == "fe":
        pytest.skip("x-derivative rows belong to the quadrature representation")
    field = make_field(MPI.COMM_WORLD, rep, element=element, out_dim=m, transform="softplus")
    J = reference_jacobian(field, with_grad)
    np.testing.assert_allclose(field.jacobian(with_grad=with_grad), J, rtol=0, atol=1e-13)
    lin = field.linearize(with_grad=with_grad, cache_mb=cache_mb)
    assert lin.cached == (cache_mb is None)
    rows = field.local_size * (1 + (field.gdim if with_grad else 0))
    assert J.shape == (rows, field.num_params)
    v = rng.standard_normal(field.num_params)
    w = rng.standard_normal(J.shape[0])
    np.testing.assert_allclose(lin.jvp(v), J @ v, rtol=0, atol=1e-12 * max(1, np.abs(J @ v).max()))
    ref = allreduce_sum(MPI.COMM_WORLD, J.T @ w)
    np.testing.assert_allclose(lin.vjp(w), ref, rtol=0, atol=1e-12 * max(1, np.abs(ref).max()))
    V, W = rng.standard_normal((field.num_params, 3)), rng.standard_normal((J.shape[0], 3))
    np.testing.assert_allclose(lin.jvp_block(V), J @ V, rtol=0, atol=1e-11)
    np.testing.assert_allclose(lin.vjp_block(W), allreduce_sum(MPI.COMM_WORLD, J.T @ W),
                               rtol=0, atol=1e-11)


@pytest.mark.parametrize("net", ["resmlp", "grown", "custom", "vector"])
def test_explicit_jacobian_of_other_modules(net):
    """Linear-layer (ResMLP, grown MLP, vector-valued) and vmap paths agree with jacfwd."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    torch.manual_seed(5)
    module = {"resmlp": lambda: nf.ResMLP(2, width=4, depth=2), "custom": ScaledSine,
              "grown": lambda: nf.MLP(2, width=3, depth=2),
              "vector": lambda: nf.MLP(2, width=3, depth=2, out_dim=2)}[net]()
    if net == "grown":
        nf.expansion.expand_depth(module, np.ones((2, 3)), np.zeros(2))
    element = ("Lagrange", 1, (2,)) if net == "vector" else None
    field = nf.NeuralField(msh, module, transform="exp", element=element,
                           factor=lambda x: x[:, 0] * (1 - x[:, 0]) + 0.5)
    assert (field._linear_layers_jacobian() is None) == (net == "custom")
    np.testing.assert_allclose(field.jacobian(), reference_jacobian(field), rtol=0, atol=1e-13)


def test_field_values_written_to_function_and_ghosts():
    field = make_field(MPI.COMM_WORLD, "fe", element=("Lagrange", 2))
    # every local dof (owned + ghost) holds the network value at its coordinate
    X = field.space.tabulate_dof_coordinates()[:, :2]
    with torch.no_grad():
        ref = field.evaluate(field.param_dict(), torch.from_numpy(X.copy())).numpy().reshape(-1)
    np.testing.assert_allclose(field.function.x.array, ref, atol=1e-14)


def test_parameter_flattening_roundtrip(rng):
    field = make_field(MPI.COMM_WORLD)
    theta = rng.standard_normal(field.num_params)
    field.set_parameters(theta)
    np.testing.assert_array_equal(field.get_parameters(), theta)
    # order is named_parameters() order, row-major
    first = next(iter(field.module.parameters()))
    np.testing.assert_array_equal(first.detach().numpy().reshape(-1), theta[: first.numel()])
    d = field.unflatten(theta)
    np.testing.assert_array_equal(nf.NeuralField.flatten(d).numpy(), theta)
    with pytest.raises(ValueError, match="shape"):
        field.set_parameters(theta[:-1])


METRIC_CASES = [("fe", "L2"), ("fe", "L2w"), ("fe", "H1"), ("fe", "energy"), ("fe", "euclidean"),
                ("quadrature", "L2"), ("quadrature", "L2w"), ("quadrature", "H1"),
                ("quadrature", "euclidean")]


@pytest.mark.parametrize("rep,kind", METRIC_CASES)
def test_gram_product_matches_dense(rep, kind, rng):
    field = make_field(MPI.COMM_WORLD, rep)
    metric = make_metric(kind, field)
    lin = field.linearize(with_grad=metric.needs_grad)
    J = field.jacobian(with_grad=metric.needs_grad)
    AJ = np.column_stack([metric.apply(J[:, j]) for j in range(J.shape[1])])
    G = allreduce_sum(MPI.COMM_WORLD, J.T @ AJ)
    np.testing.assert_allclose(G, G.T, atol=1e-12 * np.abs(G).max())
    v = rng.standard_normal(field.num_params)
    op = nf.GramOperator(metric, lin, eps=0.25)
    np.testing.assert_allclose(op.apply(v), G @ v + 0.25 * v, rtol=1e-11,
                               atol=1e-12 * np.abs(G @ v).max())
    # through the PETSc shell matrix on a distributed parameter Vec
    x, y = op.mat.createVecs()
    r0, r1 = x.getOwnershipRange()
    x.array_w[:] = v[r0:r1]
    op.mat.mult(x, y)
    np.testing.assert_allclose(y.array_r, (G @ v + 0.25 * v)[r0:r1], rtol=1e-11,
                               atol=1e-12 * np.abs(G @ v).max())
    x.destroy()
    y.destroy()
    op.destroy()
    metric.destroy()


@pytest.mark.skip_in_parallel
@pytest.mark.parametrize("kind", ["L2", "H1", "energy"])
def test_fe_metric_matches_dense_assembled_matrix(kind, rng):
    field = make_field(MPI.COMM_WORLD, "fe", element=("Lagrange", 2))
    metric = make_metric(kind, field)
    A = metric.dense_matrix()
    w = rng.standard_normal(field.local_size)
    np.testing.assert_allclose(metric.apply(w), A @ w, atol=1e-13)
    metric.destroy()


@pytest.mark.parametrize("rep,kind", [("fe", "L2"), ("fe", "L2w"), ("fe", "H1"), ("fe", "energy"),
                                      ("fe", "euclidean"), ("quadrature", "L2"),
                                      ("quadrature", "euclidean")])
def test_riesz_map_represents_the_dual_vector(rep, kind, rng):
    field = make_field(MPI.COMM_WORLD, rep, n=6, element=("Lagrange", 2) if rep == "fe" else None)
    metric = make_metric(kind, field)
    comm = MPI.COMM_WORLD
    e = rng.standard_normal(field.local_size)
    if kind == "energy":  # dual vectors of H1_0 vanish on boundary dofs
        bdofs = metric.bcs[0].dof_indices()[0]
        e[bdofs[bdofs < field.local_size]] = 0.0
    g = metric.riesz(e)
    for _ in range(3):
        h = rng.standard_normal(field.local_size)
        if kind == "energy":
            h[bdofs[bdofs < field.local_size]] = 0.0
        scale = np.sqrt(comm.allreduce(float(e @ e)) * comm.allreduce(float(h @ h)))
        assert metric.inner(g, h) == pytest.approx(comm.allreduce(float(e @ h)), abs=1e-9 * scale)
    assert metric.norm(g) ** 2 == pytest.approx(metric.dual_norm_squared(e, g), rel=1e-10)
    metric.destroy()


def test_quadrature_h1_riesz_recovers_known_representer():
    """e(v) = int phi v with phi = (2 pi^2 + 1) psi, psi = cos(pi x) cos(pi y): g = psi."""
    field = make_field(MPI.COMM_WORLD, "quadrature", n=16, quadrature_degree=4)
    metric = nf.H1(field, riesz_degree=2)
    X = field.points
    psi = np.cos(np.pi * X[:, 0]) * np.cos(np.pi * X[:, 1])
    e = field.weights * (2 * np.pi**2 + 1) * psi
    g = metric.riesz(e)
    assert g.shape == (field.local_size,)
    err = MPI.COMM_WORLD.allreduce(float(np.max(np.abs(g - psi))), op=MPI.MAX)
    assert err < 5e-3
    # ||g||_H1^2 = e . g = ||psi||_H1^2 = 1/4 + pi^2/2 (up to discretization)
    assert metric.dual_norm_squared(e, g) == pytest.approx(0.25 + np.pi**2 / 2, rel=1e-3)
    metric.destroy()


class FixedFeatures(torch.nn.Module):
    """u(x) = sum_i c_i s(w_i . x + b_i) with fixed (w, b): linear in its parameters c."""

    def __init__(self, width=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(2, width, generator=g))
        self.register_buffer("b", torch.randn(width, generator=g))
        self.c = torch.nn.Parameter(torch.randn(width, 1, generator=g))

    def forward(self, x):
        return torch.tanh(x @ self.W + self.b) @ self.c


def h1_norm(comm, rep, n):
    msh = mesh.create_unit_square(comm, n, n)
    field = nf.NeuralField(msh, FixedFeatures(), representation=rep,
                           element=("Lagrange", 2), quadrature_degree=8)
    metric = nf.H1(field)
    if rep == "quadrature":
        vals, grads = field.values_and_grads()
        w = np.concatenate([vals, grads])
    else:
        w = field.values()
    val = metric.norm(w)
    metric.destroy()
    return val


def test_h1_norm_quadrature_vs_p2_agree_with_rate():
    comm = MPI.COMM_WORLD
    exact = h1_norm(comm, "quadrature", 16)
    # the quadrature value is exact up to quadrature error (degree 8): mesh independent
    assert h1_norm(comm, "quadrature", 8) == pytest.approx(exact, rel=1e-9)
    ns = [4, 8, 16]
    errs = [abs(h1_norm(comm, "fe", n) - exact) for n in ns]
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert errs[-1] < 1e-4 * exact
    assert np.all(rates > 1.8), (errs, rates)


def test_serial_and_parallel_gram_and_norms_agree(rng):
    """Same network on the same mesh: COMM_SELF (serial) vs COMM_WORLD (distributed)."""
    results = {}
    for name, comm in (("serial", MPI.COMM_SELF), ("world", MPI.COMM_WORLD)):
        out = {}
        for rep, kinds in (("fe", ["L2", "H1", "energy", "euclidean"]),
                           ("quadrature", ["L2", "H1"])):
            field = make_field(comm, rep, n=5, seed=11)
            v = np.random.default_rng(5).standard_normal(field.num_params)
            for kind in kinds:
                metric = make_metric(kind, field)
                lin = field.linearize(with_grad=metric.needs_grad)
                op = nf.GramOperator(metric, lin)
                Gv = op.apply(v)
                w = lin.values if metric.needs_grad else field.values()
                out[(rep, kind)] = (Gv, metric.norm(w))
                metric.destroy()
        results[name] = out
    for key, (Gv, norm) in results["serial"].items():
        Gv_w, norm_w = results["world"][key]
        np.testing.assert_allclose(Gv_w, Gv, rtol=1e-10, atol=1e-10 * np.abs(Gv).max(),
                                   err_msg=str(key))
        assert norm_w == pytest.approx(norm, rel=1e-10), key


def test_bad_inputs_raise_clear_errors():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 2, 2)
    with pytest.raises(TypeError, match="float64"):
        nf.NeuralField(msh, torch.nn.Linear(2, 1, dtype=torch.float32))
    with pytest.raises(ValueError, match="representation"):
        nf.NeuralField(msh, nf.MLP(2), representation="nodal")
    with pytest.raises(ValueError, match="transform"):
        nf.NeuralField(msh, nf.MLP(2), transform="square")
    with pytest.raises(ValueError, match="cannot be evaluated"):
        nf.NeuralField(msh, nf.MLP(3))
    with pytest.raises(ValueError, match="value size"):
        nf.NeuralField(fem.functionspace(msh, ("Lagrange", 1)), nf.MLP(2, out_dim=2))
    with pytest.raises(ValueError, match="Lagrange-type"):
        nf.NeuralField(fem.functionspace(msh, ("N1curl", 1)), nf.MLP(2, out_dim=2))
    net = nf.MLP(2)
    field = nf.NeuralField(msh, net)
    theta = field.get_parameters()
    theta[0] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        field.set_parameters(theta)
