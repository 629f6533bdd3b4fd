"""The Darcy inverse problem of the flagship demo, as a builder for benchmarks B4 and B5.

-div(k grad y) = 10 on the unit square (P1, n x n cells), y = 0 on the boundary,
full-field data with 1% partition-independent noise, misfit scaled by 1/||y_obs||^2,
H1 Tikhonov (alpha = 1e-7, reference 1), k = exp(N(x)) with a tanh MLP, H1 metric
||k||^2 + l^2 ||grad k||^2 (l = 0.1) for the natural gradient.
"""

import nngf_fem as nf  # noqa: I001

from dataclasses import dataclass

import numpy as np
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI

from _common import smooth_truth, zero_boundary_condition


@dataclass
class DarcyProblem:
    """The pieces of one Darcy inversion (destroy() when done)."""

    k: nf.NeuralField
    energy: nf.PDEConstrainedEnergy
    metric: nf.H1
    dofs: int
    k_error: object  # () -> relative L2 error of k

    def destroy(self) -> None:
        """Destroy the PETSc objects."""
        self.metric.destroy()
        self.energy.destroy()


def darcy(comm: MPI.Comm, n: int, width: int = 16, depth: int = 1, noise: float = 0.01,
          alpha: float = 1e-7, length_scale: float = 0.1, seed: int = 0) -> DarcyProblem:
    """Build the problem on an ``n x n`` P1 mesh with a ``width``-neuron network."""
    msh = mesh.create_unit_square(comm, n, n)
    x = ufl.SpatialCoordinate(msh)
    k_true_expr = smooth_truth(x)
    torch.manual_seed(seed)
    k = nf.NeuralField(msh, nf.MLP(2, width=width, depth=depth), transform="exp", name="k")
    V = fem.functionspace(msh, ("Lagrange", 1))
    y, v = fem.Function(V, name="y"), ufl.TestFunction(V)
    F = ufl.inner(k.ufl * ufl.grad(y), ufl.grad(v)) * ufl.dx - 10.0 * v * ufl.dx
    bc = zero_boundary_condition(V)
    k_true = fem.Function(k.space, name="k_true")
    k_true.interpolate(fem.Expression(k_true_expr, k.space.element.interpolation_points))
    pre = nf.PDEConstrainedEnergy(F, y, [bc], control=k, misfit=0.5 * y**2 * ufl.dx)
    y_clean = nf.pde.synthetic_state(pre, k_true)
    pre.destroy()
    y_obs = nf.add_noise(y_clean, noise, seed=seed)
    scale = 1.0 / comm.allreduce(fem.assemble_scalar(fem.form(y_obs**2 * ufl.dx)))
    y.x.array[:] = 0.0
    energy = nf.PDEConstrainedEnergy(F, y, [bc], control=k,
                                     misfit=0.5 * scale * (y - y_obs) ** 2 * ufl.dx,
                                     regularization=nf.Tikhonov(alpha, "H1", reference=1.0))
    metric = nf.H1(k, alpha=1.0, beta=length_scale**2)
    err_form = fem.form((k.ufl - k_true_expr) ** 2 * ufl.dx)
    k_norm = np.sqrt(comm.allreduce(fem.assemble_scalar(fem.form(k_true_expr**2 * ufl.dx))))

    def k_error() -> float:
        return float(np.sqrt(comm.allreduce(fem.assemble_scalar(err_form))) / k_norm)

    return DarcyProblem(k, energy, metric, V.dofmap.index_map.size_global, k_error)
