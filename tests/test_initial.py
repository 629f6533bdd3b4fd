"""Initial guess of a neural field and parameters identical on all ranks (issues 14 and 15)."""

import nngf_fem as nf
from nngf_fem.expansion import expand_width

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI

COMM = MPI.COMM_WORLD


def quadratic_np(x):
    """k0(x) = 1.5 + x y + x^2 / 4 on points (n, 2) (numpy or torch)."""
    return 1.5 + x[:, 0] * x[:, 1] + 0.25 * x[:, 0] ** 2


def quadratic_grad(x):
    return np.column_stack([x[:, 1] + 0.5 * x[:, 0], x[:, 0]])


def quadratic_function(msh):
    """The same k0 as a P2 Function (exact: k0 is quadratic)."""
    V = fem.functionspace(msh, ("Lagrange", 2))
    f = fem.Function(V)
    f.interpolate(lambda x: 1.5 + x[0] * x[1] + 0.25 * x[0] ** 2)
    return f


def unit_square(n=4, comm=COMM):
    return mesh.create_unit_square(comm, n, n)


def field_with(msh, initial, rep="fe", transform="exp", width=4, seed=7, **kw):
    torch.manual_seed(seed)
    return nf.NeuralField(msh, nf.MLP(2, width=width, depth=2), transform=transform,
                          representation=rep, initial=initial, **kw)


def assert_starts_at(field, expected):
    """Owned values and the Function's owned dofs equal ``expected`` to 1e-14 relative."""
    vals = field.values().reshape(expected.shape)
    np.testing.assert_allclose(vals, expected, rtol=1e-14, atol=0)
    np.testing.assert_allclose(field.read(field.function).reshape(expected.shape), expected,
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("transform", ["exp", "identity", "softplus"])
@pytest.mark.parametrize("rep", ["fe", "quadrature"])
@pytest.mark.parametrize("kind", ["number", "callable", "function"])
def test_field_starts_exactly_at_initial(kind, rep, transform):
    msh = unit_square()
    initial = {"number": 0.37, "callable": quadratic_np,
               "function": quadratic_function(msh)}[kind]
    field = field_with(msh, initial, rep, transform)
    X = field.points
    expected = np.full(field.n_points, 0.37) if kind == "number" else quadratic_np(X)
    assert field.initial_kind == {"number": "constant"}.get(kind, kind)
    assert_starts_at(field, expected)
    out = field.module.output_layer
    assert torch.count_nonzero(out.weight) == 0
    # the offset is used where the values are (a constant lives in the output bias)
    assert field.has_offset == (kind != "number")


@pytest.mark.parametrize("transform", ["exp", "softplus"])
def test_large_and_small_positive_guesses_are_exact(transform):
    msh = unit_square()
    for k0 in (1e-6, 0.5, 30.0, 700.0):
        field = field_with(msh, k0, "fe", transform)
        assert_starts_at(field, np.full(field.n_points, k0))


def test_vector_valued_initial():
    msh = unit_square()
    torch.manual_seed(3)
    f = nf.NeuralField(msh, nf.MLP(2, width=3, out_dim=2), transform="softplus",
                       initial=[0.5, 2.0])
    assert_starts_at(f, np.tile([0.5, 2.0], (f.n_points, 1)))
    g = nf.NeuralField(msh, nf.MLP(2, width=3, out_dim=2), representation="quadrature",
                       initial=lambda x: np.column_stack([x[:, 0], 1 + x[:, 1]]))
    assert_starts_at(g, np.column_stack([g.points[:, 0], 1 + g.points[:, 1]]))


def test_ufl_expression_and_sequential_module():
    msh = unit_square()
    x = ufl.SpatialCoordinate(msh)
    net = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 1)).double()
    field = nf.NeuralField(msh, net, transform="exp", representation="quadrature",
                           initial=1.5 + x[0] * x[1] + 0.25 * x[0] ** 2)
    assert_starts_at(field, quadratic_np(field.points))
    _, grads = field.values_and_grads()
    np.testing.assert_allclose(grads.reshape(-1, 2), quadratic_grad(field.points), rtol=0,
                               atol=1e-13)


def test_default_exp_field_is_exactly_one():
    msh = unit_square()
    torch.manual_seed(11)
    k = nf.NeuralField(msh, nf.MLP(2, width=2, depth=1), transform="exp")
    assert k.initial_kind == "default" and not k.has_offset
    np.testing.assert_array_equal(k.values(), 1.0)
    np.testing.assert_array_equal(k.function.x.array, 1.0)
    assert torch.count_nonzero(k.module.output_layer.weight) == 0
    assert torch.count_nonzero(k.module.output_layer.bias) == 0
    assert torch.count_nonzero(k.module.hidden_layers[0].weight) > 0  # hidden layers random
    # identity/softplus keep the module's initialization; initial="module" keeps it for exp
    for transform, initial in (("identity", None), ("softplus", None), ("exp", "module")):
        torch.manual_seed(11)
        net = nf.MLP(2, width=2, depth=1)
        theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
        theta = torch.from_numpy(COMM.bcast(theta.numpy(), root=0))
        f = nf.NeuralField(msh, net, transform=transform, initial=initial)
        assert f.initial_kind == "module"
        np.testing.assert_array_equal(f.get_parameters(), theta.numpy())


def test_zero_output_layer_gradient_is_expected():
    """At the start only the output layer moves: hidden columns of J vanish."""
    msh = unit_square()
    k = field_with(msh, quadratic_np, "fe", "exp")
    J = k.jacobian()
    n_out = sum(p.numel() for p in k.module.output_layer.parameters())
    np.testing.assert_array_equal(J[:, : k.num_params - n_out], 0.0)
    # d u / d bias = T'(0 + o) = k0 (exp)
    np.testing.assert_allclose(J[:, -1], quadratic_np(k.points), rtol=1e-14)


def randomize(field, seed=5, scale=0.5):
    theta = np.random.default_rng(seed).standard_normal(field.num_params) * scale
    field.set_parameters(theta)
    return theta


def reference_jacobian(field, with_grad=False):
    jac = torch.func.jacfwd(field.flat_evaluator(with_grad))(field.param_dict())
    return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in jac], dim=1).numpy()


def fd_rows(field, theta, v, with_grad, h=1e-6):
    """Central finite difference of the (values, x-derivatives) rows along ``v``."""
    def rows(t):
        field.set_parameters(t)
        if with_grad:
            return np.concatenate(field.values_and_grads())
        return field.values()
    out = (rows(theta + h * v) - rows(theta - h * v)) / (2 * h)
    field.set_parameters(theta)
    return out


@pytest.mark.parametrize("rep,initial,with_grad", [
    ("fe", "callable", False), ("fe", "function", False), ("quadrature", "callable", False),
    ("quadrature", "callable", True), ("quadrature", "function", True)])
def test_jacobian_with_offset_matches_finite_differences(rep, initial, with_grad, rng,
                                                         monkeypatch):
    msh = unit_square()
    k0 = quadratic_np if initial == "callable" else quadratic_function(msh)
    field = field_with(msh, k0, rep, "softplus")
    theta = randomize(field)
    J = field.jacobian(with_grad=with_grad)
    np.testing.assert_allclose(J, reference_jacobian(field, with_grad), rtol=0, atol=1e-13)
    if not with_grad:  # the linear-layer fast path vs the vmap path
        fast = field._linear_layers_jacobian()
        assert fast is not None
        monkeypatch.setattr(field, "_linear_layers_jacobian", lambda: None)
        vm, _ = field.jacobian_parts()
        monkeypatch.undo()
        np.testing.assert_allclose(fast, vm, rtol=0, atol=1e-13)
    v = COMM.bcast(rng.standard_normal(field.num_params), root=0)
    fd = fd_rows(field, theta, v, with_grad)
    np.testing.assert_allclose(J @ v, fd, rtol=0, atol=1e-7 * max(1.0, np.abs(fd).max()))
    w = rng.standard_normal(J.shape[0])
    ref = nf.mpi.allreduce_sum(COMM, J.T @ w)
    for cache_mb in (0.0, None):
        lin = field.linearize(with_grad=with_grad, cache_mb=cache_mb)
        np.testing.assert_allclose(lin.jvp(v), J @ v, rtol=0, atol=1e-12)
        np.testing.assert_allclose(lin.vjp(w), ref, rtol=0, atol=1e-11 * np.abs(ref).max())


@pytest.mark.parametrize("initial", ["callable", "function"])
def test_x_derivatives_include_the_offset_gradient(initial):
    """Quadrature H1 rows: grad u = T'(N + o) (grad N + grad o), vs finite differences in x."""
    msh = unit_square()
    k0 = quadratic_np if initial == "callable" else quadratic_function(msh)
    field = field_with(msh, k0, "quadrature", "exp")
    _, g0 = field.values_and_grads()  # at the start: grad u = grad k0
    np.testing.assert_allclose(g0.reshape(-1, 2), quadratic_grad(field.points), rtol=0,
                               atol=1e-12)
    randomize(field)
    _, g = field.values_and_grads()
    # reference: the same network with a callable offset, differentiated by x-differences
    ref_field = field_with(msh, quadratic_np, "quadrature", "exp")
    ref_field.set_parameters(field.get_parameters())
    X, h = torch.from_numpy(field.points.copy()), 1e-6
    p = ref_field.param_dict()
    fd = []
    with torch.no_grad():
        for d in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[d] = h
            du = ref_field.evaluate(p, X + e) - ref_field.evaluate(p, X - e)
            fd.append(du[:, 0] / (2 * h))
    fd = torch.stack(fd, dim=1).numpy()
    np.testing.assert_allclose(g.reshape(-1, 2), fd, rtol=0, atol=1e-7 * np.abs(fd).max())


def test_numpy_only_callable_has_no_x_derivatives():
    msh = unit_square()
    field = field_with(msh, lambda x: np.exp(x[:, 0]), "quadrature", "exp")
    assert_starts_at(field, np.exp(field.points[:, 0]))
    with pytest.raises(NotImplementedError, match="gradient of the initial guess"):
        field.values_and_grads()
    with pytest.raises(NotImplementedError, match="gradient of the initial guess"):
        nf.H1(field)  # noqa: B018 - H1 on quadrature needs x-derivatives
        field.linearize(with_grad=True)


def test_offset_in_output_sensitivity_and_expansion():
    msh = unit_square()
    field = field_with(msh, quadratic_np, "fe", "exp", width=3)
    # du/dN = exp(N + o) = k0 at the start
    np.testing.assert_allclose(field.output_sensitivity()[:, 0], quadratic_np(field.points),
                               rtol=1e-14)
    randomize(field)
    before = field.values()
    expand_width(field.module, 1, np.ones((2, 3)), np.zeros(2))
    field.update()
    np.testing.assert_allclose(field.values(), before, rtol=1e-14)


def test_function_offset_at_other_points_is_refused():
    msh = unit_square()
    field = field_with(msh, quadratic_function(msh), "fe", "exp")
    with pytest.raises(ValueError, match="field's points only"):
        field.evaluate(field.param_dict(), torch.zeros(3, 2, dtype=torch.float64))
    # a callable offset is known everywhere
    f2 = field_with(msh, quadratic_np, "fe", "exp")
    X = np.array([[0.1, 0.2], [0.3, 0.9]])
    with torch.no_grad():
        v = f2.evaluate(f2.param_dict(), torch.from_numpy(X))[:, 0].numpy()
    np.testing.assert_allclose(v, quadratic_np(X), rtol=1e-14)


class NoOutputLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 3, dtype=torch.float64)

    def forward(self, x):
        return torch.sin(self.lin(x)).sum(dim=1, keepdim=True)


def test_bad_initial_guesses_raise_clear_errors_on_all_ranks():
    msh = unit_square()
    with pytest.raises(ValueError, match=r"must be > 0 for transform='exp'.*minimum is -0\.5"):
        field_with(msh, -0.5)
    with pytest.raises(ValueError, match=r"> 0 for transform='softplus'.*minimum is -0\.5"):
        field_with(msh, lambda x: x[:, 0] - 0.5, transform="softplus")
    # NaN at the right edge only: on some ranks only, raised on all
    with pytest.raises(ValueError, match="NaN/Inf"):
        field_with(msh, lambda x: np.where(x[:, 0] > 0.99, np.nan, 1.0))
    with pytest.raises(ValueError, match="NaN/Inf"):
        field_with(msh, float("nan"), transform="identity")
    with pytest.raises(ValueError, match=r"must return shape \(\d+,\)"):
        field_with(msh, lambda x: np.ones((x.shape[0], 3)))
    with pytest.raises(ValueError, match="raised ZeroDivisionError"):
        field_with(msh, lambda x: 1 / 0)
    other = unit_square(3)
    with pytest.raises(ValueError, match="Function on another mesh"):
        field_with(msh, quadratic_function(other))
    V2 = fem.functionspace(msh, ("Lagrange", 1, (2,)))
    with pytest.raises(ValueError, match="value shape"):
        field_with(msh, fem.Function(V2))
    with pytest.raises(ValueError, match="inverse_transform"):
        field_with(msh, 1.0, transform=torch.sinh)
    with pytest.raises(ValueError, match="factor= or lift="):
        field_with(msh, 1.0, factor=lambda x: x[:, 0])
    with pytest.raises(TypeError, match="module whose output is an nn.Linear"):
        nf.NeuralField(msh, NoOutputLayer(), initial=2.0)
    with pytest.raises(ValueError, match="not known"):
        field_with(msh, "ones")
    with pytest.raises(TypeError, match="initial must be"):
        field_with(msh, object())
    with pytest.raises(TypeError, match="initial must be"):
        field_with(msh, True)
    with pytest.raises(ValueError, match="needs 1 value, got 2"):
        field_with(msh, [1.0, 2.0])
    with pytest.raises(ValueError, match="does not start at the initial guess"):
        field_with(msh, 2.0, transform=torch.sinh, inverse_transform=lambda k: k)


def test_custom_transform_with_inverse():
    msh = unit_square()
    field = field_with(msh, quadratic_np, "quadrature", torch.sinh, inverse_transform=torch.asinh)
    assert_starts_at(field, quadratic_np(field.points))
    _, g = field.values_and_grads()
    np.testing.assert_allclose(g.reshape(-1, 2), quadratic_grad(field.points), atol=1e-12)


def test_module_without_output_layer_keeps_its_start_with_exp():
    msh = unit_square()
    field = nf.NeuralField(msh, NoOutputLayer(), transform="exp")
    assert field.initial_kind == "module"
    assert not np.allclose(field.values(), 1.0)


@pytest.mark.skipif(COMM.size == 1, reason="needs several ranks")
def test_constant_initial_must_agree_across_ranks():
    with pytest.raises(ValueError, match="differs between MPI ranks"):
        field_with(unit_square(), 1.0 + COMM.rank)


def test_unseeded_parameters_agree_across_ranks_and_with_serial():
    """Each rank seeds torch with its rank: parameters and energy are rank 0's (serial seed 0)."""
    x_target = lambda msh: ufl.sin(ufl.pi * ufl.SpatialCoordinate(msh)[0])  # noqa: E731
    results = {}
    for name, comm, seed in (("world", COMM, COMM.rank), ("serial", MPI.COMM_SELF, 0)):
        msh = unit_square(5, comm)
        torch.manual_seed(seed)
        u = nf.NeuralField(msh, nf.MLP(2, width=4, depth=2), transform="softplus",
                           element=("Lagrange", 2))
        energy = nf.RegressionEnergy(u, x_target(msh), norm="H1")
        results[name] = (u.get_parameters(), energy.value())
        energy.destroy()
    theta, E = results["world"]
    all_theta = COMM.allgather(theta)
    for t in all_theta:
        np.testing.assert_array_equal(t, all_theta[0])
    np.testing.assert_array_equal(theta, results["serial"][0])
    assert E == pytest.approx(results["serial"][1], rel=1e-12)


def test_broadcast_parameters_reports_and_removes_differences():
    msh = unit_square()
    field = field_with(msh, None, transform="identity")
    assert field.broadcast_parameters() == 0.0
    theta = field.get_parameters()
    if COMM.rank == COMM.size - 1:
        theta = theta + 0.25
    field.set_parameters(theta)
    diff = field.broadcast_parameters()
    assert diff == pytest.approx(0.25 if COMM.size > 1 else 0.0, rel=1e-12)
    ref = COMM.bcast(field.get_parameters(), root=0)
    np.testing.assert_array_equal(field.get_parameters(), ref)
    with pytest.raises(ValueError, match="root must be a rank"):
        field.broadcast_parameters(root=COMM.size)


@pytest.mark.skipif(COMM.size == 1, reason="needs several ranks")
def test_modules_of_different_shape_across_ranks_raise():
    with pytest.raises(ValueError, match="differ in names or shapes"):
        nf.NeuralField(unit_square(), nf.MLP(2, width=2 + COMM.rank))


def test_parametric_field_constant_initial():
    msh = unit_square()
    mus = np.array([[0.2], [0.8]])
    torch.manual_seed(COMM.rank)
    field = nf.ParametricField(msh, nf.MLP(3, width=4, depth=1), mus, transform="softplus",
                               initial=0.7)
    np.testing.assert_allclose(field.values(), 0.7, rtol=1e-14)
    for s in field.samples:
        np.testing.assert_allclose(s.read(s.function), 0.7, rtol=1e-14)
    np.testing.assert_allclose(field.predict([0.5]).x.array, 0.7, rtol=1e-14)
    ref = COMM.bcast(field.get_parameters(), root=0)
    np.testing.assert_array_equal(field.get_parameters(), ref)
    assert field.broadcast_parameters() == 0.0
    default = nf.ParametricField(msh, nf.MLP(3, width=4, depth=1), mus, transform="exp")
    np.testing.assert_array_equal(default.values(), 1.0)
    with pytest.raises(NotImplementedError, match="constant initial guess only"):
        nf.ParametricField(msh, nf.MLP(3, width=4, depth=1), mus, initial=quadratic_np)


def test_parametric_constant_offset_without_output_bias():
    """An output layer without bias keeps the constant as an offset, shared by all samples."""
    msh = unit_square()
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 1, bias=False)).double()
    field = nf.ParametricField(msh, net, np.array([[0.1], [0.9]]), transform="exp",
                               initial=2.5)
    np.testing.assert_allclose(field.values(), 2.5, rtol=1e-14)
    randomize(field, scale=0.3)
    J = field.jacobian()
    np.testing.assert_allclose(J, reference_jacobian(field), rtol=0, atol=1e-13)
    parts = [s.jacobian_parts()[0] for s in field.samples]
    np.testing.assert_allclose(J, np.concatenate(parts), rtol=0, atol=1e-13)
