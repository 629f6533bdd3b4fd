"""Argument checks: numpy and Python scalars alike, bools and non-numbers refused."""

import nngf_fem as nf
from nngf_fem._validate import ArgumentTypeError, as_int, as_real

import numpy as np
import pytest
import torch
from dolfinx import mesh
from mpi4py import MPI


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3), np.array(3),
                                   torch.tensor(3)])
def test_as_int_accepts_python_and_numpy_integers(value):
    out = as_int("width", value, minimum=1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(False), 3.0, np.float32(3), "3", None,
                                   np.array([3]), 2 + 0j])
def test_as_int_refuses_non_integers(value):
    with pytest.raises(TypeError, match=r"^width must be an integer >= 1, got ") as info:
        as_int("width", value, minimum=1)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError)  # also caught by `except ValueError`


def test_as_int_bounds_name_the_value():
    with pytest.raises(ValueError, match=r"^iterations must be an integer >= 0, got -1$"):
        as_int("iterations", -1, minimum=0)
    with pytest.raises(ValueError,
                       match=r"^degree must be an integer in \[1, 3\], got np.int64\(4\)$"):
        as_int("degree", np.int64(4), minimum=1, maximum=3)
    assert as_int("degree", 3, minimum=1, maximum=3) == 3


@pytest.mark.parametrize("value,expected", [(0.5, 0.5), (np.float32(0.5), 0.5), (2, 2.0),
                                            (np.int64(2), 2.0), (np.array(0.25), 0.25),
                                            (torch.tensor(0.5), 0.5), (np.float16(1), 1.0)])
def test_as_real_accepts_python_and_numpy_numbers(value, expected):
    out = as_real("eps", value, minimum=0)
    assert out == expected and type(out) is float


@pytest.mark.parametrize("value", [True, "1", 1j, np.complex128(1), None, np.array([1.0]),
                                   np.array(True)])
def test_as_real_refuses_non_numbers(value):
    with pytest.raises(ArgumentTypeError, match=r"^eps must be a finite real number >= 0, got "):
        as_real("eps", value, minimum=0)


def test_as_real_domain():
    with pytest.raises(ValueError, match=r"^eps must be a finite real number >= 0, got -1$"):
        as_real("eps", -1, minimum=0)
    with pytest.raises(ValueError, match=r"got nan$"):
        as_real("eps", float("nan"))
    with pytest.raises(ValueError, match=r"^tol must be a finite positive real number, got 0$"):
        as_real("tol", 0, positive=True)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5$"):
        as_real("theta", 1.5, minimum=0, maximum=1)
    assert as_real("max", float("inf"), finite=False) == float("inf")
    with pytest.raises(ValueError, match="got nan"):
        as_real("max", float("nan"), finite=False, minimum=0)


def test_numpy_arguments_across_the_package():
    net = nf.MLP(np.int64(2), width=np.int64(4), depth=np.int32(2))
    assert net.widths == [4, 4] and type(net.in_dim) is int
    assert nf.MLP(2, width=np.array([3, 5])).widths == [3, 5]
    assert nf.ResMLP(2, width=np.int64(4), depth=np.int64(0)).widths == [4]
    with pytest.raises(ValueError, match=r"^width must be an integer >= 1, got 0$"):
        nf.MLP(2, width=0)
    with pytest.raises(ValueError, match=r"width\[1\] must be an integer >= 1, got 2.5"):
        nf.MLP(2, width=[3, 2.5])
    with pytest.raises(ValueError, match=r"^depth must be an integer >= 0, got -1$"):
        nf.ResMLP(2, depth=-1)
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    u = nf.NeuralField(msh, nf.MLP(2, width=3), element=("Lagrange", 1))
    metric = nf.H1(u, alpha=np.float32(1.0), beta=np.float64(0.01))
    assert metric.beta == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"H1 alpha must be a finite positive real number, got 0"):
        nf.H1(u, alpha=0)
    with pytest.raises(ValueError, match=r"H1 beta must be a finite real number >= 0, got -1"):
        nf.H1(u, beta=-1)
    energy = nf.RegressionEnergy(u, 1.0, alpha=np.float32(2.0), quadrature_degree=np.int64(2))
    with pytest.raises(ValueError, match=r"alpha must be a finite real number >= 0, got -1"):
        nf.RegressionEnergy(u, 1.0, alpha=-1)
    with pytest.raises(ValueError, match=r"needs alpha > 0, got alpha=0"):
        nf.RegressionEnergy(u, 1.0, alpha=0)
    adam = nf.TorchOptimizerFlow(energy, "adam", lr=np.float32(1e-2))
    assert adam.run(np.int64(2)).iterations == 2
    with pytest.raises(ValueError, match=r"^max_iter must be an integer >= 0, got -1$"):
        adam.run(-1)
    with pytest.raises(ValueError, match=r"^lr must be a finite positive real number, got 0"):
        nf.TorchOptimizerFlow(energy, "adam", lr=0)
    metric.destroy()


def test_energy_arguments_are_checked():
    import ufl

    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    u = nf.NeuralField(msh, nf.MLP(2, width=3), element=("Lagrange", 1))
    with pytest.raises(TypeError, match="functional must be a UFL form, .* got float"):
        nf.FunctionalEnergy(u, 1.0)
    v = ufl.TestFunction(u.space)
    with pytest.raises(ValueError, match=r"scalar \(rank-0\) form; it has 1 Test/TrialFunct"):
        nf.FunctionalEnergy(u, u.ufl * v * ufl.dx)
    with pytest.raises(TypeError, match=r"RitzEnergy: l must be a callable v -> form, got float"):
        nf.RitzEnergy(u, a=lambda w, z: ufl.inner(ufl.grad(w), ufl.grad(z)) * ufl.dx, l=1.0)
