"""A user problem for `nngf-fem run examples/my_problem.toml`: build(comm) -> energy."""

import nngf_fem as nf

import ufl
from dolfinx import mesh


def build(comm):
    """H1 regression of a kink function on the unit square."""
    msh = mesh.create_unit_square(comm, 12, 12)
    u = nf.NeuralField(msh, nf.MLP(2, width=4, depth=1), element=("Lagrange", 2))
    x = ufl.SpatialCoordinate(msh)
    return nf.RegressionEnergy(u, abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1]), norm="H1")
