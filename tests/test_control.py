"""The control protocols: who implements what, clear errors, a user's own control."""

import nngf_fem as nf  # noqa: I001

import numpy as np
import pytest
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI


@pytest.fixture(scope="module")
def domain():
    return mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)


def test_concrete_controls_implement_their_protocols(domain):
    field = nf.NeuralField(domain, nf.MLP(2, width=3, depth=1))
    param = nf.ParametricField(domain, nf.MLP(3, width=3, depth=1), mus=[[0.0], [1.0]])
    fe = nf.FEControl(domain, transform="exp")
    assert isinstance(field, nf.FunctionControl) and isinstance(field, nf.NetworkControl)
    assert isinstance(param, nf.NetworkControl) and not isinstance(param, nf.FunctionControl)
    assert isinstance(fe, nf.FunctionControl) and not isinstance(fe, nf.NetworkControl)
    assert all(isinstance(c, nf.Control) for c in (field, param, fe))
    assert isinstance(field.default_metric(), nf.H1)
    assert isinstance(param.default_metric(), nf.ProductMetric)
    assert isinstance(field.linearize(), nf.control.Linearized)


def test_errors_name_the_missing_members(domain):
    fe = nf.FEControl(domain)
    energy = nf.RegressionEnergy(fe, 1.0)  # a UFL energy works on any FunctionControl
    with pytest.raises(TypeError, match="NaturalGradientFlow needs a NetworkControl.*lacks "
                                        "module, get_parameters"):
        nf.NaturalGradientFlow(energy)
    with pytest.raises(TypeError, match="TorchOptimizerFlow needs a NetworkControl"):
        nf.TorchOptimizerFlow(energy)
    with pytest.raises(TypeError, match="H1 needs a FunctionControl.*object lacks comm"):
        nf.H1(object())
    with pytest.raises(TypeError, match="RegressionEnergy needs a FunctionControl"):
        nf.RegressionEnergy(3.0, 1.0)
    with pytest.raises(TypeError, match="EnergyFunctional needs a Control"):
        nf.EnergyFunctional("k")
    energy.destroy()


class NodalControl:
    """A user's own control: nodal values of a P1 Function, no network, no FEControl."""

    representation = "fe"

    def __init__(self, domain):
        self.space = fem.functionspace(domain, ("Lagrange", 1))
        self.mesh, self.comm = domain, domain.comm
        self.value_size, self.gdim = 1, domain.geometry.dim
        self.function = fem.Function(self.space)
        self._rows = np.arange(self.space.dofmap.index_map.size_local)

    ufl = property(lambda self: self.function)
    n_points = property(lambda self: self._rows.size)
    local_size = n_points

    def values(self):
        return self.function.x.array[self._rows].copy()

    def update(self):
        self.function.x.scatter_forward()

    def owned_rows(self):
        return self._rows

    def read(self, function):
        return function.x.array[self._rows].copy()

    def write(self, local_values, function):
        function.x.array[self._rows] = local_values
        function.x.scatter_forward()


def test_a_users_control_works_with_energies_and_metrics(domain):
    """Duck typing is the contract: a class that has the members is served."""
    c = NodalControl(domain)
    assert isinstance(c, nf.FunctionControl) and not isinstance(c, nf.NetworkControl)
    c.function.interpolate(lambda x: x[0] + 2 * x[1])
    c.update()
    target = fem.Function(c.space)
    target.interpolate(lambda x: 1.0 + 0 * x[0])
    energy = nf.RegressionEnergy(c, target)
    H = nf.H1(c, beta=0.1)
    e = energy.derivative()
    g = H.riesz(e)
    # E = 1/2 ||u - t||^2_L2: the L2 derivative is M (u - t); its H1 Riesz map is
    # (M + 0.1 K)^{-1} M (u - t), whose H1 norm^2 equals e . g
    assert H.dual_norm_squared(e) == pytest.approx(c.comm.allreduce(float(e @ g)))
    assert energy.value() == pytest.approx(c.comm.allreduce(fem.assemble_scalar(fem.form(
        0.5 * (c.ufl - target) ** 2 * ufl.dx))))
    H.destroy()
    energy.destroy()


def test_fe_baselines_accept_a_metric_object(domain):
    """TaoSolver with nf.H1(control, ...) is the same solver as alpha=, beta=."""
    V = fem.functionspace(domain, ("Lagrange", 1))
    y, v = fem.Function(V), ufl.TestFunction(V)
    results = []
    for use_metric in (False, True):
        k = nf.FEControl(domain, transform="exp")
        F = (k.ufl * ufl.inner(ufl.grad(y), ufl.grad(v)) - v) * ufl.dx
        fdim = domain.topology.dim - 1
        domain.topology.create_connectivity(fdim, fdim + 1)
        bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(
            V, fdim, mesh.exterior_facet_indices(domain.topology)), V)
        yd = fem.Function(V)
        yd.interpolate(lambda x: 0.05 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
        energy = nf.PDEConstrainedEnergy(F, y, [bc], control=k,
                                         misfit=0.5 * (y - yd) ** 2 * ufl.dx)
        if use_metric:
            metric = nf.H1(k, beta=0.01, petsc_options={"ksp_rtol": 1e-14})
            solver = nf.TaoSolver(energy, metric=metric)
        else:
            metric = None
            solver = nf.TaoSolver(energy, beta=0.01, riesz_options={"ksp_rtol": 1e-14})
        solver.run(5)
        results.append((k.get_m(), [r["energy"] for r in solver.history]))
        solver.destroy()
        if metric is not None:
            assert metric.A is not None  # the solver does not destroy a metric it was given
            metric.destroy()
        energy.destroy()
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-10)
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-8, atol=1e-10)


def test_metric_petsc_matrix(domain):
    """FE metrics hand out their matrix; diagonal metrics a diagonal one; H1 at quadrature
    points has x-derivative rows and no matrix on the values."""
    fe = nf.FEControl(domain)
    eye = nf.Euclidean(fe)
    D = eye.petsc_matrix()
    assert D is eye.petsc_matrix()  # made once
    x, y = D.createVecs()
    x.array_w[:] = np.arange(fe.local_size, dtype=float)
    D.mult(x, y)
    np.testing.assert_array_equal(y.array_r, x.array_r)
    x.destroy()
    y.destroy()
    h1 = nf.H1(fe, beta=0.1)
    assert h1.petsc_matrix() is h1.A
    q = nf.NeuralField(domain, nf.MLP(2, width=3, depth=1), representation="quadrature")
    l2q, h1q = nf.L2(q), nf.H1(q)
    w = np.random.default_rng(0).standard_normal(q.local_size)
    xq, yq = l2q.petsc_matrix().createVecs()
    xq.array_w[:] = w
    l2q.petsc_matrix().mult(xq, yq)
    np.testing.assert_allclose(yq.array_r, l2q.apply(w), rtol=1e-14)
    xq.destroy()
    yq.destroy()
    with pytest.raises(ValueError, match="x-derivative rows"):
        h1q.petsc_matrix()
    for m in (eye, h1, l2q, h1q):
        m.destroy()
    assert eye._diag is None


def test_parametric_field_metric_error_points_to_product_metric(domain):
    param = nf.ParametricField(domain, nf.MLP(3, width=3, depth=1), mus=[[0.0], [1.0]])
    with pytest.raises(TypeError, match=r"use nf.ProductMetric\(field, nf.H1"):
        nf.H1(param)
    m = nf.ProductMetric(param, nf.H1, beta=0.01)
    assert m.base.beta == 0.01
    m.destroy()
